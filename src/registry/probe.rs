//! Probes (`probe_interval`, see the operations guide): an upstream in cooldown is asked
//! `GET {endpoint}/models` with its key every `probe_interval`, so a recovered upstream gets its
//! place back before any client request is risked on it, and a dead one costs no client its
//! timeout. A probe is never a paid call, and it counts only in `probes_total` (never in the
//! attempts or the status page's request history). With PostgreSQL the replicas take turns:
//! each due probe is claimed in the table first, so the upstream gets one probe per interval
//! from all of them together.

use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix_web::http::header;

use super::shared::SharedWrite;
use super::UpstreamRegistry;
use crate::config::UpstreamAuth;

/// A probe that has no answer by then failed (`timeout`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// A probe claim that was not granted is asked for again after at most this, if no other
/// replica's claim arrived meanwhile.
const RECLAIM: Duration = Duration::from_secs(1);

impl UpstreamRegistry {
    /// Upstream `i` is in cooldown: makes (or claims) its probe when one is due.
    pub(super) fn probe_step(&mut self, i: usize, now: Instant, ctx: &mut Context<Self>) {
        let Some(every) = self.config.probe_interval else {
            return;
        };
        let sharing = self.sharing();
        let h = &mut self.health[i];
        if h.probing {
            return;
        }
        match h.next_probe {
            None => {
                h.next_probe = Some(now + every);
                return;
            }
            Some(due) if due > now => return,
            Some(_) => {}
        }
        if sharing {
            // The claim's answer (the row) sets the next one; this is in case nobody won.
            h.next_probe = Some(now + every.min(RECLAIM));
            if let Some(s) = &self.share {
                s.write(SharedWrite::ClaimProbe {
                    upstream: self.config.upstreams[i].name.to_string(),
                    every: every.as_secs_f64(),
                });
            }
        } else {
            h.next_probe = Some(now + every);
            self.probe(i, ctx);
        }
    }

    /// Sends upstream `i` its probe; the result comes back to [`Self::probed`].
    pub(super) fn probe(&mut self, i: usize, ctx: &mut Context<Self>) {
        let Some(client) = &self.client else {
            return;
        };
        let up = &self.config.upstreams[i];
        let mut req = client
            .get(format!("{}/models", up.base))
            .insert_header((header::ACCEPT, "application/json"))
            .insert_header((header::ACCEPT_ENCODING, "identity"));
        // `sk: asis` has no key of its own: the probe goes without one.
        if let UpstreamAuth::Bearer(v) = &up.auth {
            req = req.insert_header((header::AUTHORIZATION, v.clone()));
        }
        self.health[i].probing = true;
        let name = up.name.to_string();
        let work = async move {
            match actix_rt::time::timeout(PROBE_TIMEOUT, req.send()).await {
                Err(_) | Ok(Err(awc::error::SendRequestError::Timeout)) => "timeout",
                Ok(Err(_)) => "connect_error",
                Ok(Ok(resp)) if resp.status().is_success() => "ok",
                Ok(Ok(_)) => "http_error",
            }
        };
        ctx.spawn(
            work.into_actor(self)
                .map(move |result, act, _| act.probed(&name, result)),
        );
    }

    /// A probe's result: a 2xx ends the cooldown, anything else starts a new one.
    fn probed(&mut self, name: &str, result: &'static str) {
        self.metrics.probe(name, result);
        let Some(i) = self.index_of(name) else {
            return;
        };
        let h = &mut self.health[i];
        h.probing = false;
        h.last_probe = Some((SystemTime::now(), result));
        self.write(SharedWrite::Probed {
            upstream: name.to_string(),
            result,
        });
        let h = &mut self.health[i];
        if h.cooldown_until.is_none() {
            // It recovered meanwhile.
            return;
        }
        if result == "ok" {
            self.recover(i, "a probe answered");
        } else {
            log::info!("upstream {name}: probe failed ({result}); its cooldown starts again");
            self.cool(i, self.config.cooldown, false, None);
        }
    }
}
