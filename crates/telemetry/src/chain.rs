//! Printing an error with its causes, each once.
//!
//! Libraries outside this workspace (kube, hyper, tonic) often repeat their source in their own
//! message *and* return it from `source()`; printing the chain naively (`{e:#}`) shows such a
//! cause twice. [`chain`] skips a cause whose text the message before it already contains.
//! Must not change what an error says, only how often.

use std::error::Error;
use std::fmt;

/// Displays `e` and its causes joined by `: `, each once. `{:#}` of an anyhow error, minus the
/// repetitions.
pub fn chain<'a>(e: &'a (dyn Error + 'static)) -> Chain<'a> {
    Chain(e)
}

/// See [`chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = messages(self.0.to_string(), self.0.source());
        f.write_str(&parts.join(": "))
    }
}

/// The messages of `first` (already rendered) and of every cause from `next` on, without the
/// causes the text before them already contains.
fn messages(first: String, mut next: Option<&(dyn Error + 'static)>) -> Vec<String> {
    let mut parts = vec![first];
    while let Some(cause) = next {
        let text = cause.to_string();
        let said = parts.last().is_some_and(|p| p.contains(text.as_str()));
        if !said && !text.is_empty() {
            parts.push(text);
        }
        next = cause.source();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let root = E("connection refused", None);
        let mid = E("HyperError: connection refused", Some(Box::new(root)));
        let top = E("read Secret ca", Some(Box::new(mid)));
        assert_eq!(
            chain(&top).to_string(),
            "read Secret ca: HyperError: connection refused"
        );
        let plain = E("a", Some(Box::new(E("b", Some(Box::new(E("c", None)))))));
        assert_eq!(chain(&plain).to_string(), "a: b: c");
    }
}
