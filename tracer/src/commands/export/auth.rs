//! Basic auth for `--web-config`'s `basic_auth_users`, as the exporter toolkit does it:
//! a password is checked against the user's bcrypt hash, and only a check that passed
//! is remembered (by a SHA-256 of the user, the password and the hash), so a scrape
//! pays bcrypt once, not each time.
//!
//! A user that is not configured is checked against a decoy hash of the highest cost
//! in use, so an unknown user takes as long as a wrong password and the answer does not
//! say which user names exist. bcrypt runs one check at a time on tokio's blocking
//! threads: a flood of wrong passwords queues there (bounded by `--max-connections`)
//! and never stalls the event loop, so scrapes with remembered credentials go on.

use std::{cell::RefCell, collections::BTreeMap, collections::HashSet, sync::Arc};

use base64::Engine as _;
use hyper::header::HeaderValue;
use tokio::sync::Semaphore;

/// The most remembered checks; the set starts again when full. Only passing checks are
/// remembered, so a handful is normal: one per user (and per configuration change).
const REMEMBERED: usize = 256;

/// The users of one configuration: each user's bcrypt hash.
pub type Users = Arc<BTreeMap<String, String>>;

pub struct Auth {
    /// One bcrypt at a time.
    bcrypt: Semaphore,
    /// Keys of the (user, password, hash) checks that passed.
    passed: RefCell<HashSet<[u8; 32]>>,
    /// A valid bcrypt hash (of nothing anyone knows) at cost 04, whose cost digits are
    /// replaced to make the decoy of any cost: checking against it costs what checking
    /// against a real hash of that cost does.
    decoy: String,
    /// bcrypt checks run, for the tests.
    runs: std::cell::Cell<u64>,
}

impl Auth {
    pub fn new() -> Result<Self, String> {
        let decoy = bcrypt::hash_with_salt(b"kvmtrace decoy", 4, [0x5a; 16])
            .map_err(|e| format!("cannot make the decoy bcrypt hash: {e}"))?
            .format_for_version(bcrypt::Version::TwoB);
        Ok(Self {
            bcrypt: Semaphore::new(1),
            passed: RefCell::new(HashSet::new()),
            decoy,
            runs: std::cell::Cell::new(0),
        })
    }

    /// Whether the request's `Authorization` header names one of `users` with its
    /// password. With no users configured every request may pass.
    pub async fn allows(&self, users: &Users, authorization: Option<&HeaderValue>) -> bool {
        if users.is_empty() {
            return true;
        }
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let known = std::str::from_utf8(&user)
            .ok()
            .and_then(|u| users.get(u))
            .cloned();
        let is_known = known.is_some();
        let hash = known.unwrap_or_else(|| self.decoy_for(users));
        let key = remembered_key(&user, &password, &hash);
        if is_known && self.passed.borrow().contains(&key) {
            return true;
        }
        let Ok(_permit) = self.bcrypt.acquire().await else {
            return false;
        };
        self.runs.set(self.runs.get() + 1);
        let matches = tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let passed = match matches {
            Ok(matches) => is_known && matches,
            Err(e) => {
                log::warn!("basic auth: bcrypt failed: {e}");
                false
            }
        };
        if passed {
            let mut remembered = self.passed.borrow_mut();
            if remembered.len() >= REMEMBERED {
                remembered.clear();
            }
            remembered.insert(key);
        }
        passed
    }

    /// The decoy hash at the highest cost among `users`.
    fn decoy_for(&self, users: &Users) -> String {
        let cost = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .max()
            .unwrap_or(4);
        // "$2b$04$..." with its cost (4..=31, checked at load) in place of 04.
        format!("{}{cost:02}{}", &self.decoy[..4], &self.decoy[6..])
    }
}

/// The user and password of a `Basic` authorization header, as bytes.
fn credentials(header: &HeaderValue) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = header.as_bytes();
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.get(6..)?.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// The key a passed check is remembered by: SHA-256 of the user, the password and the
/// hash, each with its length, so no password is kept and a changed hash is checked
/// anew.
fn remembered_key(user: &[u8], password: &[u8], hash: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, password, hash.as_bytes()] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    }
    let mut key = [0; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn users(cost: u32) -> Users {
        let hash = bcrypt::hash("secret", cost).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(BTreeMap::from([("prometheus".to_owned(), hash)]))
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {b64}")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn auth() -> Auth {
        Auth::new().unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn the_right_password_passes_and_is_remembered() {
        let (auth, users) = (auth(), users(4));
        assert!(
            auth.allows(&users, Some(&basic("prometheus", "secret")))
                .await
        );
        assert!(
            auth.allows(&users, Some(&basic("prometheus", "secret")))
                .await
        );
        assert_eq!(auth.runs.get(), 1, "the second check is remembered");
        // The scheme's case does not matter.
        let lower = HeaderValue::from_str(
            &basic("prometheus", "secret")
                .to_str()
                .unwrap_or_default()
                .replace("Basic", "basic"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(auth.allows(&users, Some(&lower)).await);
    }

    #[tokio::test]
    async fn refusals_run_bcrypt_every_time_and_are_not_remembered() {
        let (auth, users) = (auth(), users(4));
        for _ in 0..2 {
            assert!(
                !auth
                    .allows(&users, Some(&basic("prometheus", "wrong")))
                    .await
            );
            assert!(!auth.allows(&users, Some(&basic("grafana", "secret"))).await);
        }
        assert_eq!(
            auth.runs.get(),
            4,
            "an unknown user runs bcrypt as a wrong password does"
        );
        assert!(auth.passed.borrow().is_empty());
    }

    #[tokio::test]
    async fn a_missing_or_malformed_header_is_refused() {
        let (auth, users) = (auth(), users(4));
        assert!(!auth.allows(&users, None).await);
        for bad in ["Bearer abc", "Basic", "Basic !!!", "Basic cHJvbWV0aGV1cw=="] {
            let v = HeaderValue::from_static(bad);
            assert!(!auth.allows(&users, Some(&v)).await, "{bad}");
        }
    }

    #[tokio::test]
    async fn no_users_no_auth() {
        assert!(auth().allows(&Arc::new(BTreeMap::new()), None).await);
    }

    #[test]
    fn the_decoy_has_the_highest_cost_in_use() {
        let auth = auth();
        let mut map = BTreeMap::new();
        map.insert(
            "a".to_owned(),
            bcrypt::hash("x", 4).unwrap_or_else(|e| panic!("{e}")),
        );
        map.insert(
            "b".to_owned(),
            bcrypt::hash("x", 6).unwrap_or_else(|e| panic!("{e}")),
        );
        let decoy = auth.decoy_for(&Arc::new(map));
        let parts: bcrypt::HashParts = decoy.parse().unwrap_or_else(|e| panic!("{decoy}: {e}"));
        assert_eq!(parts.get_cost(), 6);
        assert_eq!(bcrypt::verify("x", &decoy).ok(), Some(false));
    }

    /// An unknown user takes about as long as a wrong password (a loose bound: the
    /// machine may be busy), where without the decoy it would take no time at all.
    #[tokio::test]
    async fn an_unknown_user_takes_as_long_as_a_wrong_password() {
        let (auth, users) = (auth(), users(9));
        let time = |user: &'static str| {
            let (auth, users) = (&auth, &users);
            async move {
                let t = Instant::now();
                assert!(!auth.allows(users, Some(&basic(user, "wrong"))).await);
                t.elapsed()
            }
        };
        let (wrong, unknown) = (time("prometheus").await, time("grafana").await);
        assert!(
            unknown * 3 >= wrong && wrong * 3 >= unknown,
            "unknown user {unknown:?}, wrong password {wrong:?}"
        );
    }
}
