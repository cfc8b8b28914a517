//! The loaded eBPF object, and its maps by name, typed or a [`ProbeError`].

use aya::{
    Ebpf,
    maps::{Map, MapError},
    programs::{Program, ProgramError},
};

use super::error::{ProbeError, map_err};

/// The loaded object. Dropping it detaches its programs.
pub(super) struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    pub fn new(ebpf: Ebpf) -> Self {
        Self { ebpf }
    }

    /// The object, to walk its programs and maps.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The object, to hand to what needs it whole (the logger).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Map `name` as a `T` (`Array<&MapData, u32>`, ...).
    pub fn typed<'a, T>(&'a self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        T::try_from(map).map_err(map_err(name))
    }

    /// Map `name` as a writable `T` (`Array<&mut MapData, u32>`, ...).
    pub fn typed_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(ProbeError::MissingMap(name))?;
        T::try_from(map).map_err(map_err(name))
    }

    /// Takes map `name` out of the object, as a `T` that owns it (`RingBuf<MapData>`).
    pub fn take<T>(&mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(ProbeError::MissingMap(name))?;
        T::try_from(map).map_err(map_err(name))
    }

    /// The program `name`.
    pub fn program_mut(&mut self, name: &str) -> Result<&mut Program, ProbeError> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| ProbeError::Program {
                action: "find",
                program: name.to_owned(),
                source: ProgramError::NotLoaded,
            })
    }
}
