//! The Mesh API's `Policies` stream: this cluster's network policies for its own node agents
//! (and admins) — the whole set once it is complete, then what changed. A caller that is no
//! longer admitted (its Node deleted) is cut off.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use wire::pb;

use super::server::{Recheck, standing_changed};
use crate::policies::{PolicyKey, PolicySet};

/// The stream of `Policies`.
pub type PoliciesStream = ReceiverStream<Result<pb::PoliciesResponse, Status>>;

fn object(k: &PolicyKey, json: Option<&[u8]>) -> pb::PolicyObject {
    pb::PolicyObject {
        kind: k.0.clone(),
        namespace: k.1.clone(),
        name: k.2.clone(),
        json: json.map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

fn refused(set: &PolicySet) -> Vec<String> {
    set.refused
        .iter()
        .map(|(k, why)| {
            let name = if k.1.is_empty() {
                k.2.clone()
            } else {
                format!("{}/{}", k.1, k.2)
            };
            format!("{} {name}: {why}", k.0)
        })
        .collect()
}

/// The message that takes a caller from `before` (nothing yet: a reset) to `now`; `None`
/// when nothing it sees changed.
pub fn message(before: Option<&PolicySet>, now: &PolicySet) -> Option<pb::PoliciesResponse> {
    let Some(before) = before else {
        return Some(pb::PoliciesResponse {
            reset: true,
            upserts: now.valid.iter().map(|(k, v)| object(k, Some(v))).collect(),
            deletes: Vec::new(),
            refused: refused(now),
        });
    };
    let upserts: Vec<pb::PolicyObject> = now
        .valid
        .iter()
        .filter(|(k, v)| before.valid.get(*k) != Some(*v))
        .map(|(k, v)| object(k, Some(v)))
        .collect();
    let deletes: Vec<pb::PolicyObject> = before
        .valid
        .keys()
        .filter(|k| !now.valid.contains_key(*k))
        .map(|k| object(k, None))
        .collect();
    let changed_refusals = before.refused != now.refused;
    if upserts.is_empty() && deletes.is_empty() && !changed_refusals {
        return None;
    }
    Some(pb::PoliciesResponse {
        reset: false,
        upserts,
        deletes,
        refused: refused(now),
    })
}

/// Streams `rx` to one caller until it goes away, is no longer admitted, or the server stops.
pub(crate) fn serve(
    mut rx: watch::Receiver<Arc<PolicySet>>,
    mut recheck: Option<Recheck>,
    mut stop: watch::Receiver<bool>,
) -> PoliciesStream {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut sent: Option<Arc<PolicySet>> = None;
        loop {
            let now = rx.borrow_and_update().clone();
            if now.synced {
                if let Some(msg) = message(sent.as_deref(), &now)
                    && tx.send(Ok(msg)).await.is_err()
                {
                    return;
                }
                sent = Some(now);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = async { let _ = stop.wait_for(|s| *s).await; } => return,
                () = tx.closed() => return,
                () = standing_changed(&mut recheck) => {
                    if let Some(rc) = &recheck
                        && let Err(reason) = rc.admitted()
                    {
                        tracing::warn!(caller = %rc.identity(), reason = %reason, "ending a Policies stream: the caller is no longer admitted");
                        let _ = tx.send(Err(Status::permission_denied(reason))).await;
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> PolicyKey {
        ("CiliumNetworkPolicy".into(), "shop".into(), n.into())
    }

    #[test]
    fn a_reset_then_only_what_changed() {
        let mut a = PolicySet {
            synced: true,
            ..Default::default()
        };
        a.valid.insert(key("p1"), Arc::new(b"{1}".to_vec()));
        a.valid.insert(key("p2"), Arc::new(b"{2}".to_vec()));
        let first = message(None, &a).expect("a reset");
        assert!(first.reset);
        assert_eq!(first.upserts.len(), 2);
        assert!(message(Some(&a), &a).is_none(), "nothing changed");
        let mut b = a.clone();
        b.valid.remove(&key("p1"));
        b.valid.insert(key("p2"), Arc::new(b"{2b}".to_vec()));
        b.refused.insert(key("bad"), "spec.x: wrong".into());
        let m = message(Some(&a), &b).expect("changes");
        assert!(!m.reset);
        assert_eq!(
            (m.upserts.len(), m.deletes.len()),
            (1, 1),
            "p2 rewritten, p1 gone"
        );
        assert_eq!(
            m.refused,
            vec!["CiliumNetworkPolicy shop/bad: spec.x: wrong"]
        );
    }
}
