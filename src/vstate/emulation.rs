//! Completing the few instructions a software-emulated KVM cannot run.
//!
//! On hosts where KVM runs every guest instruction through the kernel's x86 emulator (nested
//! virtualisation without hardware support), a stock Linux guest stops on a handful of
//! instructions the emulator does not implement and KVM reports an emulation failure with
//! the instruction bytes. kiln completes exactly these — nothing else — and continues:
//!
//! | bytes | instruction | completion |
//! | --- | --- | --- |
//! | `cc` | int3 | RIP += 1, then inject #BP |
//! | `9b` | fwait | skip |
//! | `0f ae e8..ff` | lfence/mfence/sfence | skip |
//! | `db e2`, `0f 77`, `db /0` | fnclex, emms, fildl | skip |
//!
//! On hardware KVM this path never runs.

/// What to do with a failed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Advance RIP past the instruction.
    Skip(u8),
    /// Advance RIP past `int3` and inject a breakpoint exception.
    Breakpoint,
}

/// Vector of the breakpoint exception.
pub const BP_VECTOR: u8 = 3;

/// Length of a ModRM memory operand (ModRM byte, SIB, displacement) starting at `modrm`;
/// `None` if the bytes end first.
fn modrm_len(bytes: &[u8]) -> Option<u8> {
    let modrm = *bytes.first()?;
    let mode = modrm >> 6;
    let rm = modrm & 7;
    if mode == 3 {
        return Some(1);
    }
    let mut len = 1u8;
    if rm == 4 {
        let sib = *bytes.get(1)?;
        len += 1;
        if mode == 0 && sib & 7 == 5 {
            len += 4;
        }
    } else if mode == 0 && rm == 5 {
        // RIP-relative disp32.
        len += 4;
    }
    len += match mode {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    (bytes.len() >= usize::from(len)).then_some(len)
}

/// The completion for the instruction at the start of `bytes`, if it is one of the table's.
pub fn completion_for(bytes: &[u8]) -> Option<Completion> {
    match bytes {
        [0xcc, ..] => Some(Completion::Breakpoint),
        [0x9b, ..] => Some(Completion::Skip(1)),
        [0x0f, 0xae, m, ..] if *m >= 0xe8 => Some(Completion::Skip(3)),
        [0x0f, 0x77, ..] => Some(Completion::Skip(2)),
        [0xdb, 0xe2, ..] => Some(Completion::Skip(2)),
        // fildl m32: `db /0` with a memory operand.
        [0xdb, rest @ ..] => {
            let modrm = *rest.first()?;
            if (modrm >> 3) & 7 != 0 || modrm >> 6 == 3 {
                return None;
            }
            modrm_len(rest).map(|n| Completion::Skip(1 + n))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        assert_eq!(completion_for(&[0xcc, 0x90]), Some(Completion::Breakpoint));
        assert_eq!(
            completion_for(&[0x9b, 0xdb, 0xe2]),
            Some(Completion::Skip(1))
        );
        assert_eq!(
            completion_for(&[0x0f, 0xae, 0xe8]),
            Some(Completion::Skip(3))
        );
        assert_eq!(
            completion_for(&[0x0f, 0xae, 0xf0, 0xc3]),
            Some(Completion::Skip(3))
        );
        assert_eq!(
            completion_for(&[0x0f, 0xae, 0xf8]),
            Some(Completion::Skip(3))
        );
        assert_eq!(completion_for(&[0xdb, 0xe2]), Some(Completion::Skip(2)));
        assert_eq!(completion_for(&[0x0f, 0x77]), Some(Completion::Skip(2)));
    }

    #[test]
    fn fildl_operand_lengths() {
        // fildl (%rax)
        assert_eq!(completion_for(&[0xdb, 0x00]), Some(Completion::Skip(2)));
        // fildl 0x10(%rdi)
        assert_eq!(
            completion_for(&[0xdb, 0x47, 0x10]),
            Some(Completion::Skip(3))
        );
        // fildl 0x12345678(%rbx)
        assert_eq!(
            completion_for(&[0xdb, 0x83, 1, 2, 3, 4]),
            Some(Completion::Skip(6))
        );
        // fildl disp32(%rip)
        assert_eq!(
            completion_for(&[0xdb, 0x05, 1, 2, 3, 4]),
            Some(Completion::Skip(6))
        );
        // fildl (%rsp) — SIB
        assert_eq!(
            completion_for(&[0xdb, 0x04, 0x24]),
            Some(Completion::Skip(3))
        );
        // fildl 8(%rsp) — SIB + disp8
        assert_eq!(
            completion_for(&[0xdb, 0x44, 0x24, 0x08]),
            Some(Completion::Skip(4))
        );
        // SIB with no base: disp32
        assert_eq!(
            completion_for(&[0xdb, 0x04, 0x25, 1, 2, 3, 4]),
            Some(Completion::Skip(7))
        );
        // Truncated bytes are not guessed at.
        assert_eq!(completion_for(&[0xdb, 0x83, 1]), None);
    }

    #[test]
    fn everything_else_stays_a_failure() {
        for bytes in [
            &[0x0f, 0x57, 0xc0][..],   // xorps
            &[0xf3, 0x0f, 0xb8, 0xc0], // popcnt
            &[0x0f, 0xae, 0x10],       // ldmxcsr (0f ae /2)
            &[0x0f, 0xae, 0xe7],       // below the fences
            &[0xdb, 0x08],             // fisttp (db /1)
            &[0xdb, 0xc0],             // fcmovnb (register form)
            &[0xd9, 0xe8],             // fld1
            &[0x0f, 0x01, 0xca],       // clac
            &[],
        ] {
            assert_eq!(completion_for(bytes), None, "{bytes:x?}");
        }
    }
}
