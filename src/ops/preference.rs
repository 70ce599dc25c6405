//! The preference losses, per pair, as TRL 1.15 defines them, with their derivatives with respect
//! to the policy's sequence log-probabilities (all a pair's loss depends on that training moves).
//!
//! For a pair, `c` and `r` are the policy's summed log-probabilities of the chosen and rejected
//! completions' tokens, `rc` and `rr` the reference's, `nc` and `nr` their token counts, and
//! `σ` the logistic function.
//!
//! - DPO (`trl/trainer/dpo_trainer.py`), with δ = (c − rc) − (r − rr):
//!   - `sigmoid`: ℓ = −log σ(βδ);
//!   - `hinge`: ℓ = max(0, 1 − βδ);
//!   - `ipo`: ℓ = (δ′ − 1/(2β))², δ′ = (c − rc)/nc − (r − rr)/nr (per-token averages);
//!   - `robust`: ℓ = (−(1 − ε) log σ(βδ) + ε log σ(−βδ)) / (1 − 2ε), ε the label smoothing.
//! - SimPO (`trl/experimental/cpo`, `loss_type = "simpo"`, no NLL term), on the averages
//!   a = c/nc and b = r/nr: ℓ = −(1 − ε) log σ(β(a − b) − γ) − ε log σ(−(β(a − b) − γ)).
//! - ORPO (`trl/experimental/orpo`), on the averages: ℓ = −λ log σ(L) with the log odds ratio
//!   L = (a − b) − (log(1 − eᵃ) − log(1 − eᵇ)); the NLL of the chosen completion is added by the
//!   caller, per chosen token.
//!
//! - KTO (`trl/trainer/kto_trainer.py`), per unpaired example with z = c − rc and the batch's KL
//!   estimate k (detached, at least 0): a desirable example ℓ = w_d (1 − σ(β(z − k))), an
//!   undesirable one ℓ = w_u (1 − σ(β(k − z))).
//!
//! The rewards TRL logs are β(c − rc) and β(r − rr) for DPO, βa and βb for SimPO and ORPO.

pub use crate::recipe::DpoKind;

/// Which preference loss, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PairLoss {
    Dpo {
        kind: DpoKind,
        beta: f64,
        label_smoothing: f64,
    },
    Simpo {
        beta: f64,
        gamma: f64,
        label_smoothing: f64,
    },
    Orpo {
        lambda: f64,
    },
}

/// KTO's settings: β and the weights of desirable and undesirable examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kto {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Kto {
    /// One example's loss, its derivative with respect to the policy's summed log-probability of
    /// the completion, and its reward β·(c − rc); `kl` is the batch's KL estimate.
    pub fn example(&self, logp: f64, ref_logp: f64, kl: f64, desirable: bool) -> (f64, f64, f64) {
        let z = logp - ref_logp;
        let (w, x, sign) = match desirable {
            true => (self.desirable_weight, self.beta * (z - kl), -1.0),
            false => (self.undesirable_weight, self.beta * (kl - z), 1.0),
        };
        let s = sigmoid(x);
        (
            w * (1.0 - s),
            sign * w * self.beta * s * (1.0 - s),
            self.beta * z,
        )
    }
}

/// What one pair's loss needs: the policy's and (DPO) the reference's summed log-probabilities,
/// and the completions' token counts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// A pair's loss, its derivatives with respect to the policy's summed log-probabilities of the
/// chosen and rejected completions, and the rewards TRL logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairOutcome {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// The log-probabilities TRL logs (`logps/chosen`, `logps/rejected`): sums for DPO, per-token
    /// averages for SimPO and ORPO.
    pub logp_chosen: f64,
    pub logp_rejected: f64,
}

/// log σ(x), finite for any x.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 − eˣ) for x < 0, as TRL's `log1mexp`.
fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

/// ℓ(z) = −(1 − ε) log σ(z) − ε log σ(−z) and dℓ/dz.
fn smoothed_logistic(z: f64, eps: f64) -> (f64, f64) {
    let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    let d = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
    (loss, d)
}

impl PairLoss {
    /// Whether the loss compares with a reference model (DPO).
    pub fn needs_reference(&self) -> bool {
        matches!(self, PairLoss::Dpo { .. })
    }

    /// One pair's loss and derivatives.
    pub fn pair(&self, p: &PairLogps) -> PairOutcome {
        let (nc, nr) = (
            p.chosen_tokens.max(1) as f64,
            p.rejected_tokens.max(1) as f64,
        );
        match *self {
            PairLoss::Dpo {
                kind,
                beta,
                label_smoothing: eps,
            } => {
                let (lc, lr) = (p.chosen - p.ref_chosen, p.rejected - p.ref_rejected);
                let delta = lc - lr;
                let (loss, d_chosen, d_rejected) = match kind {
                    DpoKind::Sigmoid => {
                        let d = -beta * sigmoid(-beta * delta);
                        (-log_sigmoid(beta * delta), d, -d)
                    }
                    DpoKind::Hinge => {
                        let m = 1.0 - beta * delta;
                        let d = if m > 0.0 { -beta } else { 0.0 };
                        (m.max(0.0), d, -d)
                    }
                    DpoKind::Ipo => {
                        let e = lc / nc - lr / nr - 1.0 / (2.0 * beta);
                        (e * e, 2.0 * e / nc, -2.0 * e / nr)
                    }
                    DpoKind::Robust => {
                        let z = beta * delta;
                        let loss = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z))
                            / (1.0 - 2.0 * eps);
                        let d = beta * (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z))
                            / (1.0 - 2.0 * eps);
                        (loss, d, -d)
                    }
                };
                PairOutcome {
                    loss,
                    d_chosen,
                    d_rejected,
                    reward_chosen: beta * lc,
                    reward_rejected: beta * lr,
                    logp_chosen: p.chosen,
                    logp_rejected: p.rejected,
                }
            }
            PairLoss::Simpo {
                beta,
                gamma,
                label_smoothing,
            } => {
                let (a, b) = (p.chosen / nc, p.rejected / nr);
                let (loss, dz) = smoothed_logistic(beta * (a - b) - gamma, label_smoothing);
                PairOutcome {
                    loss,
                    d_chosen: dz * beta / nc,
                    d_rejected: -dz * beta / nr,
                    reward_chosen: beta * a,
                    reward_rejected: beta * b,
                    logp_chosen: a,
                    logp_rejected: b,
                }
            }
            PairLoss::Orpo { lambda } => {
                let (a, b) = (p.chosen / nc, p.rejected / nr);
                let log_odds = (a - b) - (log1mexp(a) - log1mexp(b));
                let dl = -lambda * sigmoid(-log_odds);
                // dL/da = 1 + eᵃ/(1 − eᵃ) = 1/(1 − eᵃ) = −1/expm1(a).
                let (da, db) = (-1.0 / a.exp_m1(), 1.0 / b.exp_m1());
                PairOutcome {
                    loss: -lambda * log_sigmoid(log_odds),
                    d_chosen: dl * da / nc,
                    d_rejected: dl * db / nr,
                    reward_chosen: lambda * a,
                    reward_rejected: lambda * b,
                    logp_chosen: a,
                    logp_rejected: b,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each loss's derivatives equal its central differences.
    #[test]
    fn derivatives_match_finite_differences() {
        let base = PairLogps {
            chosen: -7.3,
            rejected: -9.1,
            ref_chosen: -7.9,
            ref_rejected: -8.6,
            chosen_tokens: 5,
            rejected_tokens: 7,
        };
        let losses = [
            PairLoss::Dpo {
                kind: DpoKind::Sigmoid,
                beta: 0.1,
                label_smoothing: 0.0,
            },
            PairLoss::Dpo {
                kind: DpoKind::Hinge,
                beta: 0.3,
                label_smoothing: 0.0,
            },
            PairLoss::Dpo {
                kind: DpoKind::Ipo,
                beta: 0.1,
                label_smoothing: 0.0,
            },
            PairLoss::Dpo {
                kind: DpoKind::Robust,
                beta: 0.1,
                label_smoothing: 0.2,
            },
            PairLoss::Simpo {
                beta: 2.0,
                gamma: 0.5,
                label_smoothing: 0.1,
            },
            PairLoss::Orpo { lambda: 0.1 },
        ];
        let h = 1e-6;
        for loss in losses {
            let at = |c: f64, r: f64| {
                loss.pair(&PairLogps {
                    chosen: c,
                    rejected: r,
                    ..base
                })
                .loss
            };
            let o = loss.pair(&base);
            let dc = (at(base.chosen + h, base.rejected) - at(base.chosen - h, base.rejected))
                / (2.0 * h);
            let dr = (at(base.chosen, base.rejected + h) - at(base.chosen, base.rejected - h))
                / (2.0 * h);
            assert!(
                (o.d_chosen - dc).abs() < 1e-7,
                "{loss:?}: {} vs {dc}",
                o.d_chosen
            );
            assert!(
                (o.d_rejected - dr).abs() < 1e-7,
                "{loss:?}: {} vs {dr}",
                o.d_rejected
            );
        }
    }

    /// KTO's derivative equals its central difference, for both labels.
    #[test]
    fn kto_derivative_matches_finite_differences() {
        let k = Kto {
            beta: 0.3,
            desirable_weight: 1.0,
            undesirable_weight: 1.33,
        };
        for desirable in [true, false] {
            let (_, d, _) = k.example(-5.0, -5.4, 0.2, desirable);
            let h = 1e-6;
            let fd = (k.example(-5.0 + h, -5.4, 0.2, desirable).0
                - k.example(-5.0 - h, -5.4, 0.2, desirable).0)
                / (2.0 * h);
            assert!((d - fd).abs() < 1e-8, "{desirable}: {d} vs {fd}");
        }
    }

    /// DPO sigmoid at δ = 0 is log 2 with derivative −β/2, as the formula gives.
    #[test]
    fn dpo_at_the_reference_is_log_two() {
        let o = PairLoss::Dpo {
            kind: DpoKind::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
        }
        .pair(&PairLogps {
            chosen: -3.0,
            rejected: -4.0,
            ref_chosen: -3.0,
            ref_rejected: -4.0,
            chosen_tokens: 2,
            rejected_tokens: 2,
        });
        assert!((o.loss - std::f64::consts::LN_2).abs() < 1e-12);
        assert!((o.d_chosen + 0.05).abs() < 1e-12);
    }
}
