//! The job token: every RPC carries `authorization: Bearer <token>`; the
//! coordinator's interceptor answers anything else with `UNAUTHENTICATED`,
//! logs it, and goes on serving the others.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A random token of 128 bits, hex-encoded.
pub fn generate_token() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// The server side: compares digests in constant time, so the comparison
/// tells nothing about how much of a guess was right.
#[derive(Clone)]
pub struct TokenCheck {
    digest: [u8; 32],
}

impl TokenCheck {
    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest
            .iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The interceptor body.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.matches(token) => Ok(req),
            other => {
                let peer = req
                    .remote_addr()
                    .map_or_else(|| "an unknown peer".to_owned(), |a| a.to_string());
                let what = if other.is_some() { "a wrong" } else { "no" };
                tracing::warn!("refused a request from {peer} with {what} job token");
                Err(Status::unauthenticated(format!(
                    "{what} job token: pass the coordinator's token with --token or COHORT_TOKEN"
                )))
            }
        }
    }
}

/// The client side: adds the token to every request.
#[derive(Clone)]
pub struct BearerToken {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl BearerToken {
    /// Fails if the token has characters a header can't carry.
    pub fn new(token: &str) -> Result<Self, crate::LauncherError> {
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| crate::LauncherError::InvalidToken)?;
        Ok(Self { header })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(header: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        req
    }

    #[test]
    fn only_the_right_token_passes() {
        let check = TokenCheck::new("secret");
        assert!(check.check(request(Some("Bearer secret"))).is_ok());
        let wrong = check.check(request(Some("Bearer secreT"))).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().starts_with("a wrong job token"));
        let missing = check.check(request(None)).unwrap_err();
        assert!(missing.message().starts_with("no job token"));
    }

    #[test]
    fn generated_tokens_differ() {
        assert_ne!(generate_token(), generate_token());
        assert_eq!(generate_token().len(), 32);
    }
}
