//! How the CLI prints an error: the context chain once, and a Kubernetes API refusal the way
//! kubectl prints it (`Error from server (NotFound): nodes "nope" not found`), never a Debug
//! dump of a `Status`.
//!
//! Must not decide exit codes, and must not drop a cause: only repetitions and kube-rs's own
//! wrapper words (`ApiError:`, `ServiceError:`) go.

use std::error::Error;

/// A Kubernetes `Status` as kubectl prints it.
fn kubectl(s: &kube::core::Status) -> String {
    if s.code == 401 {
        return "You must be logged in to the server (Unauthorized)".to_owned();
    }
    match (s.reason.is_empty(), s.message.is_empty()) {
        (false, false) => format!("Error from server ({}): {}", s.reason, s.message),
        (true, false) => format!("Error from server: {}", s.message),
        (false, true) => format!("Error from server ({}): HTTP {}", s.reason, s.code),
        (true, true) => format!("Error from server: HTTP {}", s.code),
    }
}

/// `e` and its causes, joined by `: `, each once; kube errors as kubectl shows them.
pub(crate) fn render(e: &anyhow::Error) -> String {
    render_dyn(e.as_ref())
}

/// [`render`] of any error.
pub(crate) fn render_dyn(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(cause) = next {
        let text = if let Some(k) = cause.downcast_ref::<kube::Error>() {
            match k {
                kube::Error::Api(status) => {
                    parts.push(kubectl(status));
                    break;
                }
                // Wrapper words only: what went wrong is the source.
                kube::Error::Service(inner) => {
                    next = Some(inner.as_ref());
                    continue;
                }
                kube::Error::HyperError(inner) => {
                    next = Some(inner);
                    continue;
                }
                other => other.to_string(),
            }
        } else if let Some(status) = cause.downcast_ref::<kube::core::Status>() {
            parts.push(kubectl(status));
            break;
        } else {
            cause.to_string()
        };
        let said = parts.last().is_some_and(|p| p.contains(text.as_str()));
        if !said && !text.is_empty() {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn status(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            reason: reason.into(),
            message: message.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn kube_refusals_read_like_kubectl() {
        let e = Err::<(), _>(status(404, "NotFound", "nodes \"nope\" not found"))
            .context("context east: node nope")
            .unwrap_err();
        assert_eq!(
            render(&e),
            "context east: node nope: Error from server (NotFound): nodes \"nope\" not found"
        );
        let e = anyhow::Error::from(status(401, "Unauthorized", "Unauthorized"));
        assert_eq!(
            render(&e),
            "You must be logged in to the server (Unauthorized)"
        );
        let e = anyhow::Error::from(status(500, "", "etcd is down"));
        assert_eq!(render(&e), "Error from server: etcd is down");
    }

    #[test]
    fn a_cause_repeated_in_the_message_above_it_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io)
            .context("read kubeconfig /x: no such file")
            .context("context east");
        assert_eq!(render(&e), "context east: read kubeconfig /x: no such file");
    }
}
