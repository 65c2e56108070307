//! Progress bars on stderr (hidden when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar with a label, counting `total` steps.
pub fn bar(label: &str, total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// A spinner with a message, for work whose length is not known ahead (hidden on a non-tty).
pub fn spinner(label: &str, message: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} {spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_prefix(label.to_string());
    pb.set_message(message.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// The compression pipeline's progress as bars (a spinner for work of unknown length).
#[derive(Default)]
pub struct Bars(std::cell::RefCell<Option<(String, ProgressBar)>>);

impl whittle_compress::pipeline::Progress for Bars {
    fn start(&self, label: &str, total: usize) {
        let mut cur = self.0.borrow_mut();
        if let Some((l, pb)) = cur.as_ref()
            && l == label
        {
            pb.set_length(total as u64);
            return;
        }
        if let Some((_, pb)) = cur.take() {
            pb.finish_and_clear();
        }
        let pb = if total == 0 {
            spinner(label, "working on the calibration data")
        } else {
            bar(label, total)
        };
        *cur = Some((label.to_string(), pb));
    }

    fn set(&self, done: usize) {
        if let Some((_, pb)) = self.0.borrow().as_ref() {
            pb.set_position(done as u64);
        }
    }

    fn finish(&self) {
        if let Some((_, pb)) = self.0.borrow_mut().take() {
            pb.finish_and_clear();
        }
    }
}
