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
}
