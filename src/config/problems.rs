//! The list a validation pass fills: every rejected value, each explained.

#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<String>);

impl Problems {
    /// Record `msg` unless `ok`.
    pub(crate) fn need(&mut self, ok: bool, msg: String) {
        if !ok {
            self.0.push(msg)
        }
    }

    /// Record that `key = value` is above `limit` (`why` says where the limit comes from).
    pub(crate) fn at_most(&mut self, key: &str, value: usize, limit: usize, why: &str) {
        self.need(
            value <= limit,
            format!("{key} = {value} is above the limit of {limit} ({why})"),
        );
    }
}

/// Images a rollout batch, an evaluation batch, a group or an epoch may hold: a sanity bound far
/// past any run that fits in memory (the model-aware memory estimate comes when the model is read).
pub(crate) const MAX_IMAGES: usize = 65_536;

/// Solver steps of one sampling run: the flow-matching schedule has 1000 training timesteps.
pub(crate) const MAX_STEPS: usize = 1000;
