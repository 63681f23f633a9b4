//! What each profile runs (`quick`, `full`, `smoke`, one scenario) and at
//! which sizes: populations, step lengths, the rates each ramp climbs.

use std::time::Duration;

use crate::What;
use crate::s5::S5Plan;

/// The soak's idle clients unless `--clients` says otherwise.
const SOAK_IDLE: usize = 2_000;

/// What a profile runs and at which sizes.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) scenarios: Vec<What>,
    pub(super) clients: usize,
    pub(super) step: Duration,
    pub(super) s1_points: Vec<usize>,
    pub(super) s2_rates_20: Vec<f64>,
    pub(super) s2_rates_1: Vec<f64>,
    pub(super) s3_rates: Vec<f64>,
    pub(super) s3_probes: usize,
    pub(super) s7_seconds: f64,
    pub(super) s5: S5Plan,
    pub(super) soak: SoakPlan,
}

/// The soak's length and windows (its load is fixed: see `soak`).
#[derive(Debug, Clone)]
pub(super) struct SoakPlan {
    /// Load in all (the unmeasured warm-up window comes before it).
    pub(super) duration: Duration,
    /// One reported window.
    pub(super) window: Duration,
    /// Idle clients held for the whole run.
    pub(super) idle: usize,
}

impl Plan {
    pub(super) fn new(
        what: What,
        clients: Option<usize>,
        seconds: Option<f64>,
        soak_minutes: f64,
        soak_window_seconds: f64,
    ) -> Plan {
        let full = what == What::Full;
        let smoke = what == What::Smoke;
        let scenarios = match what {
            What::Quick | What::Full => vec![
                What::S0,
                What::S1,
                What::S2,
                What::S6,
                What::S2Ws,
                What::S3,
                What::S4,
                What::S7,
                What::S5,
            ],
            What::Smoke => vec![What::S0, What::S2, What::S3, What::S4],
            What::S5Smoke => vec![What::S5],
            // Ratios need the floor of the same run.
            What::S2 => vec![What::S0, What::S2],
            What::S2Ws => vec![What::S0, What::S2Ws],
            What::S6 => vec![What::S2, What::S6],
            other => vec![other],
        };
        let default_clients = match what {
            What::Smoke => 50,
            What::Soak => SOAK_IDLE,
            _ => 19_000,
        };
        let clients = clients.unwrap_or(default_clients).max(1);
        let step = seconds.unwrap_or(if full {
            10.0
        } else if smoke {
            1.0
        } else {
            3.0
        });
        let mut s1_points: Vec<usize> = [1_000, 5_000, 10_000, 19_000]
            .into_iter()
            .filter(|&p| p < clients)
            .collect();
        s1_points.push(clients);
        Plan {
            scenarios,
            clients,
            step: Duration::from_secs_f64(step.max(0.1)),
            s1_points,
            s2_rates_20: if smoke {
                vec![10.0]
            } else if full {
                vec![
                    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0, 200.0,
                ]
            } else {
                vec![2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 160.0]
            },
            s2_rates_1: if smoke {
                vec![20.0]
            } else if full {
                vec![
                    10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1200.0,
                ]
            } else {
                vec![20.0, 50.0, 100.0, 200.0, 400.0, 800.0]
            },
            s3_rates: if smoke {
                vec![200.0]
            } else if full {
                vec![1_000.0, 5_000.0, 10_000.0, 20_000.0]
            } else {
                vec![1_000.0, 10_000.0]
            },
            s3_probes: clients.min(1_000),
            s7_seconds: if full { 40.0 } else { 20.0 },
            soak: SoakPlan {
                duration: Duration::from_secs_f64((soak_minutes * 60.0).max(1.0)),
                window: Duration::from_secs_f64(soak_window_seconds.max(1.0)),
                idle: clients,
            },
            s5: if what == What::S5Smoke {
                S5Plan {
                    rooms: 2,
                    members: 5,
                    probe_every: 2,
                    room_rates: vec![5.0],
                    room_min_seconds: 1.0,
                    key_clients: 10,
                    key_rates: vec![50.0],
                    key_callers: vec![4],
                    seconds: seconds.unwrap_or(1.0),
                }
            } else {
                S5Plan {
                    rooms: 10,
                    members: if full { 100 } else { 50 },
                    probe_every: 5,
                    room_rates: vec![1.0, 10.0, 100.0],
                    room_min_seconds: if full { 30.0 } else { 10.0 },
                    key_clients: 200,
                    key_rates: vec![1_000.0, 3_000.0, 10_000.0],
                    // At most one caller per key client (200).
                    key_callers: if full {
                        vec![16, 64, 200]
                    } else {
                        vec![64, 200]
                    },
                    seconds: step.max(if full { 10.0 } else { 5.0 }),
                }
            },
        }
    }
}
