//! NATS URLs with credentials (`nats://user:password@host:4222`): async-nats does not
//! take a user and password from the URL, so they are split off and given to it; and a
//! URL is only ever shown with its password masked.

/// The URL without its userinfo, and the user and password it carried.
pub fn split(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_string(), None);
    };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (
        format!("{scheme}://{host}"),
        Some((user.to_string(), password.to_string())),
    )
}

/// The URL as it may be logged or printed: its password masked.
pub fn display(url: &str) -> String {
    actors::redact::text(url)
}

/// Connect options carrying the URL's credentials, if any, and trusting `ca_file` (a PEM
/// CA that signed the server's certificate, for a `tls://` URL to a server whose
/// certificate the system's roots do not cover).
pub fn options(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> (async_nats::ConnectOptions, String) {
    let (options, bare) = match split(url) {
        (bare, Some((user, password))) => (
            async_nats::ConnectOptions::with_user_and_password(user, password),
            bare,
        ),
        (bare, None) => (async_nats::ConnectOptions::new(), bare),
    };
    match ca_file {
        Some(ca) => (
            options
                .add_root_certificates(ca.to_path_buf())
                .require_tls(true),
            bare,
        ),
        None => (options, bare),
    }
}

/// The CA file the CLI trusts: `CADRE_NATS_CA_FILE`, as the node's `nats_ca_file`.
pub fn cli_ca_file() -> Option<std::path::PathBuf> {
    std::env::var_os("CADRE_NATS_CA_FILE")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_off_and_never_shown() {
        assert_eq!(
            split("nats://node:s3cret@vps.example:4222"),
            (
                "nats://vps.example:4222".to_string(),
                Some(("node".to_string(), "s3cret".to_string()))
            )
        );
        assert_eq!(split("nats://127.0.0.1:4222").1, None);
        assert_eq!(
            display("nats://node:s3cret@vps.example:4222"),
            "nats://node:[redacted]@vps.example:4222"
        );
    }
}
