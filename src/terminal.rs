//! Puts a terminal on stdin into raw-ish mode for the guest console (no line editing, no
//! local echo; Ctrl-C still stops kiln) and restores it when dropped.

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

/// Restores the saved terminal settings on drop.
#[derive(Debug)]
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output processing (the guest prints \n, not \r\n) and signal keys.
        raw.output_flags = saved.output_flags;
        raw.local_flags |= LocalFlags::ISIG;
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}
