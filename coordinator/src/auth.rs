//! Optional bearer-token auth on the Pipeline service (`--auth-token-file`). Health and
//! reflection stay open for probes and discovery.

use tonic::{Request, Status};

#[derive(Clone)]
pub struct BearerAuth {
    /// `Bearer {token}`, or None when auth is off.
    expected: Option<String>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        BearerAuth { expected: token.map(|t| format!("Bearer {t}")) }
    }

    /// Reads the token from a file (surrounding whitespace ignored; must not be empty).
    pub fn from_file(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(BearerAuth::new(None)) };
        let token = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--auth-token-file {}: {e}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            anyhow::bail!("--auth-token-file {}: the file is empty", path.display());
        }
        Ok(BearerAuth::new(Some(token.to_string())))
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(request) };
        let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata")),
        }
    }
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
        assert_eq!(auth.check(request(Some("Bearer nope"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.check(request(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(BearerAuth::new(None).check(request(None)).is_ok());
    }
}
