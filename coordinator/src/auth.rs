//! Optional bearer-token auth on the Pipeline service (`--auth-token-file`). Health and
//! reflection stay open for probes and discovery.

use tonic::{Request, Status};

#[derive(Clone)]
pub struct BearerAuth {
    /// The token, or None when auth is off.
    expected: Option<String>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        BearerAuth { expected: token }
    }

    /// Reads the token from a file (surrounding whitespace ignored). Refuses an empty token
    /// and one that no client could send: only visible ASCII fits an `authorization` header
    /// whole (a line break, space or control byte inside the token never arrives as written).
    pub fn from_file(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(BearerAuth::new(None)) };
        let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("--auth-token-file {}: {e}", path.display()))?;
        let token = text.trim_ascii();
        if token.is_empty() {
            anyhow::bail!("--auth-token-file {}: the file is empty", path.display());
        }
        if let Some(at) = token.iter().position(|b| !b.is_ascii_graphic()) {
            let what = match token[at] {
                b'\n' | b'\r' => "a line break",
                b' ' | b'\t' => "whitespace",
                b if b.is_ascii_control() => "a control character",
                _ => "a non-ASCII byte",
            };
            anyhow::bail!(
                "--auth-token-file {}: the token holds {what} at byte {at}; a bearer token must be one line of visible ASCII \
                 (no client can send it in an authorization header otherwise)",
                path.display()
            );
        }
        Ok(BearerAuth::new(Some(String::from_utf8_lossy(token).into_owned())))
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(request) };
        let Some(given) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata"));
        };
        match bearer_token(given.as_bytes()) {
            Some(token) if constant_time_eq(token, expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated("`authorization` metadata is not `Bearer <token>`")),
        }
    }
}

/// The token of `Bearer <token>`: the scheme is case-insensitive (RFC 7235, 2.1) and one or
/// more spaces separate it from the token.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) || value[SCHEME.len()] != b' ' {
        return None;
    }
    let token = value[SCHEME.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares without an early exit, so the token cannot be guessed byte by byte from timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(token: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token.parse().unwrap());
        }
        request
    }

    #[test]
    fn checks_the_bearer_token() {
        let auth = BearerAuth::new(Some("s3cret".into()));
        assert!(auth.check(request(Some("Bearer s3cret"))).is_ok());
        for scheme in ["bearer s3cret", "BEARER s3cret", "bEaReR   s3cret"] {
            assert!(auth.check(request(Some(scheme))).is_ok(), "{scheme}");
        }
        for malformed in ["Bearers3cret", "Basic s3cret", "Bearer", "Bearer  ", "s3cret"] {
            assert_eq!(auth.check(request(Some(malformed))).unwrap_err().code(), tonic::Code::Unauthenticated, "{malformed}");
        }
        assert_eq!(auth.check(request(Some("Bearer s3cre"))).unwrap_err().message(), "wrong bearer token");
        assert_eq!(auth.check(request(Some("Bearer nope"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.check(request(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(BearerAuth::new(None).check(request(None)).is_ok());
    }

    #[test]
    fn refuses_token_files_no_client_can_send() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let ok = BearerAuth::from_file(Some(&file("ok", b"  s3cret-+/=~\n"))).unwrap();
        assert_eq!(ok.expected.as_deref(), Some("s3cret-+/=~"));
        for (name, bytes, what) in [
            ("newline", &b"abc\ndef\n"[..], "a line break at byte 3"),
            ("space", b"abc def", "whitespace at byte 3"),
            ("control", b"abc\x07", "a control character at byte 3"),
            ("utf8", "abc\u{e9}".as_bytes(), "a non-ASCII byte at byte 3"),
            ("empty", b" \n", "the file is empty"),
        ] {
            let path = file(name, bytes);
            let err = BearerAuth::from_file(Some(&path)).err().unwrap().to_string();
            assert!(err.contains(&format!("--auth-token-file {}", path.display())) && err.contains(what), "{name}: {err}");
        }
    }
}
