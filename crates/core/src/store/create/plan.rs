//! Which of a batch's CreateTask requests share its transaction.
//!
//! Every valid request joins, with or without a request id, except a second request
//! with a request id already in the batch: one transaction cannot both claim a key and
//! wait for its own claim to commit. It is deferred and runs alone after the batch,
//! where it gets the first one's stored answer as any retry would.

use std::collections::HashSet;

use crate::domain::RequestContext;
use crate::error::Error;

/// A request's part in a batch.
#[derive(Debug)]
pub(super) enum Part {
    /// Refused before any store work.
    Refused(Error),
    /// In the shared transaction.
    Joins,
    /// Alone, after the batch: its key is claimed by an earlier request of the batch.
    Deferred,
}

/// Each request's part, in order. `check` validates one request.
pub(super) fn plan<'a, T: 'a>(
    requests: impl IntoIterator<Item = &'a (T, RequestContext)>,
    check: impl Fn(&T, &RequestContext) -> Result<(), Error>,
) -> Vec<Part> {
    let mut keys: HashSet<(&str, &str)> = HashSet::new();
    requests
        .into_iter()
        .map(|(request, ctx)| {
            if let Err(e) = check(request, ctx) {
                return Part::Refused(e);
            }
            match &ctx.request_id {
                Some(id) if !keys.insert((&ctx.principal, id)) => Part::Deferred,
                _ => Part::Joins,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ctx(principal: &str, request_id: Option<&str>) -> RequestContext {
        RequestContext {
            request_id: request_id.map(str::to_owned),
            ..RequestContext::new(principal)
        }
    }

    #[test]
    fn a_repeated_key_waits_for_the_batch_and_an_invalid_request_is_refused() {
        let requests = vec![
            (true, ctx("alice", Some("r1"))),
            (true, ctx("alice", None)),
            (true, ctx("bob", Some("r1"))),
            (false, ctx("carol", None)),
            (true, ctx("alice", Some("r1"))),
            (true, ctx("alice", None)),
        ];
        let parts = plan(&requests, |valid, _| {
            if *valid {
                Ok(())
            } else {
                Err(Error::invalid("title", "empty"))
            }
        });
        let names: Vec<&str> = parts
            .iter()
            .map(|p| match p {
                Part::Refused(_) => "refused",
                Part::Joins => "joins",
                Part::Deferred => "deferred",
            })
            .collect();
        assert_eq!(
            names,
            ["joins", "joins", "joins", "refused", "deferred", "joins"]
        );
    }

    proptest! {
        /// No key is claimed twice in one transaction; a request is deferred only for
        /// a key an earlier joining request claims; every valid request without a key
        /// joins.
        #[test]
        fn a_batch_claims_each_key_once(
            requests in prop::collection::vec(
                (any::<bool>(), 0..3usize, prop::option::of(0..4usize)),
                0..40,
            )
        ) {
            let requests: Vec<(bool, RequestContext)> = requests
                .into_iter()
                .map(|(valid, p, r)| {
                    let id = r.map(|r| format!("r{r}"));
                    (valid, ctx(&format!("p{p}"), id.as_deref()))
                })
                .collect();
            let parts = plan(&requests, |valid, _| {
                if *valid { Ok(()) } else { Err(Error::invalid("title", "bad")) }
            });
            prop_assert_eq!(parts.len(), requests.len());
            let mut claimed = HashSet::new();
            for ((valid, ctx), part) in requests.iter().zip(&parts) {
                let key = ctx.request_id.as_deref().map(|r| (ctx.principal.as_str(), r));
                match part {
                    Part::Refused(_) => prop_assert!(!valid),
                    Part::Joins => {
                        prop_assert!(*valid);
                        if let Some(key) = key {
                            prop_assert!(claimed.insert(key), "{:?} claimed twice", key);
                        }
                    }
                    Part::Deferred => {
                        prop_assert!(*valid);
                        prop_assert!(key.is_some_and(|k| claimed.contains(&k)));
                    }
                }
            }
        }
    }
}
