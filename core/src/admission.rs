//! The admission pipeline's decisions over a batch of messages, in the reference's order:
//! authorization → rate limit → circuit breaker → DLP. The shell gathers the facts this needs
//! from the store (each target's gate, the sender's rate grant) and records and queues what
//! comes out; the order of the checks, what a refusal consumes and which decision a message
//! gets are decided here, once, for the unary path and for batches alike.
//!
//! A batch runs in two steps, because the rate limit consumes tokens only for messages that
//! are authorized to a live target, and the store must be asked for that many:
//!
//! 1. [`Batch::new`] takes each message's authorization: the policy verdict, and for an
//!    authorized one its target's [`TargetGate`] (liveness and circuit, read from the store).
//!    [`Batch::rate_demand`] says how many messages then ask the rate limiter for a token.
//! 2. [`Batch::decide`] takes the rate [`Grant`] for that demand and the payloads, runs DLP
//!    where it matters, and returns each message's [`Verdict`].
//!
//! Deciding a batch decides exactly what deciding its messages one by one at the same instant
//! would (the rate limiter grants a prefix; see `ratelimit::admit_many`), which the tests
//! below check against a direct transcription of the reference pipeline.

use crate::payload::{CanonicalPayload, WirePayload};
use crate::policy::audit::Decision;
use crate::policy::dlp::{Action, Dlp, Violation};
use crate::policy::ratelimit::{Grant, Limited};
use crate::store::TargetGate;

/// How a message fared at authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    /// Refused by policy or because the target has no live session (`AUTHZ_DENIED`).
    Denied,
    /// Allowed by policy; the target's gate as the store reads it now.
    Granted(TargetGate),
}

impl Authorization {
    /// A reply: authorized by its request, and not gated by the requester's liveness or
    /// circuit (the requester is waiting for it). It is still rate-limited and screened.
    pub const REPLY: Authorization = Authorization::Granted(TargetGate { live: true, circuit_admits: true });

    fn asks_for_a_token(self) -> bool {
        matches!(self, Authorization::Granted(TargetGate { live: true, .. }))
    }
}

/// A batch of messages of one sender, between authorization and the rate grant.
#[derive(Debug, Clone)]
pub struct Batch {
    authorizations: Vec<Authorization>,
}

/// The decision about one message and what it carries on.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// `ALLOWED`, `ALERT` or `DLP_REDACTED` for a message to queue; a refusal otherwise.
    pub decision: Decision,
    /// What the audit record lists: the refusal's reason, or the DLP finding types.
    pub violations: Vec<String>,
    /// The payload's canonical JSON, written once: what the envelope carries (redacted when
    /// DLP said so) and what the audit record hashes, for a refusal too.
    pub payload: CanonicalPayload,
    /// DLP findings (for metrics); empty when DLP did not run or found nothing.
    pub findings: Vec<Violation>,
    /// For `RATE_LIMITED`: which window refused and when to retry.
    pub limited: Option<Limited>,
}

impl Verdict {
    /// Whether the message goes on to the store to be queued.
    pub fn routable(&self) -> bool {
        matches!(self.decision, Decision::Allowed | Decision::Alert | Decision::DlpRedacted)
    }

    fn refused(decision: Decision, reason: &str, payload: WirePayload<'_>) -> Self {
        Verdict {
            decision,
            violations: vec![reason.to_string()],
            payload: payload.canonical(),
            findings: Vec::new(),
            limited: None,
        }
    }
}

impl Batch {
    /// A batch whose messages were authorized as `authorizations` says, in sending order.
    pub fn new(authorizations: Vec<Authorization>) -> Self {
        Batch { authorizations }
    }

    /// How many messages ask the sender's rate limiter for a token: those authorized to a
    /// live target. A message refused at authorization consumes nothing.
    pub fn rate_demand(&self) -> usize {
        self.authorizations.iter().filter(|a| a.asks_for_a_token()).count()
    }

    /// The verdict of every message, given the rate grant for [`Batch::rate_demand`] tokens
    /// and the payloads (one per message, in order). DLP runs only on messages that passed
    /// every earlier check.
    ///
    /// # Panics
    /// If `payloads` does not hold one payload per message (a shell bug, not peer input).
    pub fn decide(self, grant: Grant, payloads: Vec<WirePayload<'_>>, dlp: Option<&Dlp>) -> Vec<Verdict> {
        assert_eq!(payloads.len(), self.authorizations.len(), "one payload per message");
        let mut tokens_left = grant.admitted;
        self.authorizations
            .into_iter()
            .zip(payloads)
            .map(|(authorization, payload)| {
                let gate = match authorization {
                    Authorization::Granted(gate) if gate.live => gate,
                    Authorization::Denied | Authorization::Granted(_) => {
                        return Verdict::refused(Decision::AuthzDenied, "authorization_denied", payload);
                    }
                };
                if tokens_left == 0 {
                    let mut verdict = Verdict::refused(Decision::RateLimited, "rate_limit_exceeded", payload);
                    verdict.limited = grant.refused;
                    return verdict;
                }
                tokens_left -= 1;
                if !gate.circuit_admits {
                    return Verdict::refused(Decision::CircuitOpen, "circuit_open", payload);
                }
                screen(payload, dlp)
            })
            .collect()
    }
}

/// DLP, the last check: the decision its most restrictive finding calls for.
fn screen(payload: WirePayload<'_>, dlp: Option<&Dlp>) -> Verdict {
    let Some(dlp) = dlp else {
        return Verdict {
            decision: Decision::Allowed,
            violations: Vec::new(),
            payload: payload.canonical(),
            findings: Vec::new(),
            limited: None,
        };
    };
    let scan = dlp.scan_wire(&payload);
    let kinds = scan.kinds();
    let decision = match scan.action {
        None => Decision::Allowed,
        Some(Action::Alert) => Decision::Alert,
        Some(Action::Redact) => Decision::DlpRedacted,
        Some(Action::Block) => Decision::DlpBlocked,
    };
    // A scan holds a redacted payload exactly when its action is redact.
    let payload = match &scan.redacted {
        Some(redacted) => CanonicalPayload::of(redacted),
        None => payload.canonical(),
    };
    Verdict { decision, violations: kinds, payload, findings: scan.violations, limited: None }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::envelope::{Payload, parse_payload};
    use crate::policy::dlp::DlpSettings;
    use crate::policy::ratelimit::{self, Limits, RateState, Window};
    use crate::time::Instant;

    fn payload(text: &str) -> Payload {
        parse_payload(&serde_json::json!({ "text": text }).to_string()).expect("payload")
    }

    /// One `{"text": ..}` payload per text, to be read through [`borrowed`].
    fn payloads(texts: &[&str]) -> Vec<Payload> {
        texts.iter().map(|text| payload(text)).collect()
    }

    fn borrowed(payloads: &[Payload]) -> Vec<WirePayload<'_>> {
        payloads.iter().map(WirePayload::borrowed).collect()
    }

    fn dlp() -> Dlp {
        Dlp::new(&DlpSettings::default()).expect("default rules")
    }

    const OPEN: TargetGate = TargetGate { live: true, circuit_admits: true };
    const TRIPPED: TargetGate = TargetGate { live: true, circuit_admits: false };
    const DEAD: TargetGate = TargetGate { live: false, circuit_admits: true };

    fn all_granted(n: usize) -> Grant {
        Grant { admitted: n, refused: None }
    }

    #[test]
    fn each_check_refuses_in_the_reference_order() {
        let batch = Batch::new(vec![
            Authorization::Denied,
            Authorization::Granted(DEAD),
            Authorization::Granted(TRIPPED),
            Authorization::Granted(OPEN),
            Authorization::Granted(OPEN),
        ]);
        assert_eq!(batch.rate_demand(), 3, "denied and dead-target messages take no token");
        let texts = ["a", "b", "c", "card 4111 1111 1111 1111", "hello"];
        let verdicts = batch.decide(all_granted(3), borrowed(&payloads(&texts)), Some(&dlp()));
        let decisions: Vec<_> = verdicts.iter().map(|v| v.decision).collect();
        assert_eq!(
            decisions,
            [
                Decision::AuthzDenied,
                Decision::AuthzDenied,
                Decision::CircuitOpen,
                Decision::DlpBlocked,
                Decision::Allowed
            ]
        );
        assert_eq!(verdicts[0].violations, ["authorization_denied"]);
        assert_eq!(verdicts[2].violations, ["circuit_open"]);
        assert_eq!(verdicts[3].violations, ["credit_card"]);
        assert_eq!(verdicts[3].findings.len(), 1);
        assert!(verdicts[4].violations.is_empty() && verdicts[4].routable());
    }

    #[test]
    fn the_rate_limit_comes_before_the_circuit_and_names_its_window() {
        let limited = Limited { window: Window::Hour, retry_after: Some(Duration::from_secs(3)) };
        let batch = Batch::new(vec![Authorization::Granted(TRIPPED), Authorization::Granted(TRIPPED)]);
        let grant = Grant { admitted: 1, refused: Some(limited) };
        let verdicts = batch.decide(grant, borrowed(&payloads(&["x", "y"])), None);
        assert_eq!(verdicts[0].decision, Decision::CircuitOpen, "the first took a token, then met the circuit");
        assert_eq!(verdicts[1].decision, Decision::RateLimited);
        assert_eq!(verdicts[1].limited, Some(limited));
        assert_eq!(verdicts[1].violations, ["rate_limit_exceeded"]);
    }

    #[test]
    fn replies_are_not_gated_but_still_limited_and_screened() {
        let batch = Batch::new(vec![Authorization::REPLY, Authorization::REPLY]);
        assert_eq!(batch.rate_demand(), 2);
        let verdicts = batch.decide(
            Grant { admitted: 1, refused: None },
            borrowed(&payloads(&["ssn 123-45-6789", "z"])),
            Some(&dlp()),
        );
        assert_eq!(verdicts[0].decision, Decision::DlpRedacted);
        assert!(!verdicts[0].payload.as_str().contains("123-45-6789"));
        assert!(verdicts[0].payload.as_str().contains("XXX-XX-6789"), "the redacted payload is what goes on");
        assert_eq!(verdicts[1].decision, Decision::RateLimited);
    }

    /// The reference pipeline for one message, written out as it reads (§2 of the behaviour
    /// notes), over a limiter state that it advances itself.
    fn one_by_one(
        authorization: Authorization,
        payload: Payload,
        limits: Limits,
        state: &mut RateState,
        now: Instant,
        dlp: &Dlp,
    ) -> Decision {
        let Authorization::Granted(gate) = authorization else { return Decision::AuthzDenied };
        if !gate.live {
            return Decision::AuthzDenied;
        }
        match ratelimit::admit(limits, *state, now) {
            Ok(next) => *state = next,
            Err(_) => return Decision::RateLimited,
        }
        if !gate.circuit_admits {
            return Decision::CircuitOpen;
        }
        let scan = dlp.scan(&payload);
        match scan.action {
            None => Decision::Allowed,
            Some(Action::Alert) => Decision::Alert,
            Some(Action::Redact) => Decision::DlpRedacted,
            Some(Action::Block) => Decision::DlpBlocked,
        }
    }

    fn authorization() -> impl Strategy<Value = Authorization> {
        prop_oneof![
            Just(Authorization::Denied),
            Just(Authorization::Granted(OPEN)),
            Just(Authorization::Granted(TRIPPED)),
            Just(Authorization::Granted(DEAD)),
            Just(Authorization::REPLY),
        ]
    }

    fn text() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("hello"), Just("4111 1111 1111 1111"), Just("eve@example.com"), Just("ssn 123-45-6789")]
    }

    proptest! {
        /// Batch-size independence: however a sender's messages are cut into batches, each
        /// gets the decision the reference pipeline gives it one by one.
        #[test]
        fn batches_decide_what_single_messages_would(
            messages in prop::collection::vec((authorization(), text()), 0..40),
            cuts in prop::collection::vec(1usize..8, 1..10),
            per_minute in 0u64..25,
        ) {
            let dlp = dlp();
            let limits = Limits { per_minute, per_hour: 1_000 };
            let now = Instant::from_nanos(7_000_000_000_000);
            let mut single_state = RateState::default();
            let expected: Vec<Decision> = messages
                .iter()
                .map(|(a, t)| one_by_one(*a, payload(t), limits, &mut single_state, now, &dlp))
                .collect();

            let mut batched_state = RateState::default();
            let mut got = Vec::new();
            let mut rest = &messages[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let (head, tail) = rest.split_at((*cut).min(rest.len()));
                rest = tail;
                let batch = Batch::new(head.iter().map(|(a, _)| *a).collect());
                let (next, grant) = ratelimit::admit_many(limits, batched_state, now, batch.rate_demand());
                batched_state = next;
                let texts: Vec<&str> = head.iter().map(|(_, t)| *t).collect();
                let verdicts = batch.decide(grant, borrowed(&payloads(&texts)), Some(&dlp));
                got.extend(verdicts.into_iter().map(|v| v.decision));
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(batched_state, single_state);
        }
    }
}
