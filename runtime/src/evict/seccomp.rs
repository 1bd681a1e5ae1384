//! What a task's seccomp filters answer to one system call, computed before the call is made
//! in the task: a filter that kills on `madvise` must make the injector refuse, not kill the
//! container.
//!
//! The filters are read with `PTRACE_SECCOMP_GET_FILTER` (the task must be in a ptrace stop;
//! needs `CAP_SYS_ADMIN`) and run by a classic-BPF interpreter over the `seccomp_data` the
//! kernel would build. As the kernel does, every filter runs and the most restrictive action
//! wins (the lowest action value as a signed 32-bit number). A program the interpreter does not
//! understand (an unknown opcode, a load outside `seccomp_data`, a jump out of the program)
//! counts as a kill: the injector then refuses.

use std::io;

/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_LOG`: allowed and logged.
pub const RET_LOG: u32 = 0x7ffc_0000;
/// `SECCOMP_RET_KILL_PROCESS`.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `SECCOMP_RET_ACTION_FULL`.
const ACTION_MASK: u32 = 0xffff_0000;
/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `PTRACE_SECCOMP_GET_FILTER`.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// Most instructions of one classic BPF program (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;
/// Most filters read from one task.
const MAX_FILTERS: u64 = 64;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant operand.
    pub k: u32,
}

/// The input of a seccomp filter (`struct seccomp_data`).
#[derive(Debug, Clone, Copy)]
pub struct SeccompData {
    /// System call number.
    pub nr: i32,
    /// `AUDIT_ARCH_*` of the call.
    pub arch: u32,
    /// Address of the system call instruction.
    pub instruction_pointer: u64,
    /// The six arguments.
    pub args: [u64; 6],
}

impl SeccompData {
    /// The 32-bit word at byte offset `k` of the structure, as `BPF_LD|BPF_W|BPF_ABS` loads
    /// it; `None` outside the structure or unaligned.
    fn word(&self, k: u32) -> Option<u32> {
        if !k.is_multiple_of(4) {
            return None;
        }
        let w = |v: u64, high: bool| {
            let half = if high { v >> 32 } else { v & 0xffff_ffff };
            u32::try_from(half).unwrap_or(0)
        };
        Some(match k {
            0 => self.nr.cast_unsigned(),
            4 => self.arch,
            8 | 12 => w(self.instruction_pointer, k == 12),
            16..=60 => {
                let i = ((k - 16) / 8) as usize;
                w(self.args[i], (k - 16) % 8 == 4)
            }
            _ => return None,
        })
    }
}

/// Runs one program; its return value, or `None` if the interpreter does not understand it.
pub fn run(prog: &[Insn], d: &SeccompData) -> Option<u32> {
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    // Classic BPF only jumps forward, so a program ends within its length.
    while let Some(i) = prog.get(pc) {
        pc += 1;
        let src = |x: u32| if i.code & 0x08 != 0 { x } else { i.k };
        match i.code & 0x07 {
            // BPF_LD (BPF_W only: seccomp accepts no other size)
            0x00 => {
                a = match i.code & 0xe0 {
                    0x00 => i.k,
                    0x20 if i.code & 0x18 == 0 => d.word(i.k)?,
                    0x60 => *mem.get(i.k as usize)?,
                    0x80 => 64,
                    _ => return None,
                }
            }
            // BPF_LDX
            0x01 => {
                x = match i.code & 0xe0 {
                    0x00 => i.k,
                    0x60 => *mem.get(i.k as usize)?,
                    0x80 => 64,
                    _ => return None,
                }
            }
            0x02 => *mem.get_mut(i.k as usize)? = a,
            0x03 => *mem.get_mut(i.k as usize)? = x,
            // BPF_ALU
            0x04 => {
                let v = src(x);
                a = match i.code & 0xf0 {
                    0x00 => a.wrapping_add(v),
                    0x10 => a.wrapping_sub(v),
                    0x20 => a.wrapping_mul(v),
                    0x30 => a.checked_div(v)?,
                    0x40 => a | v,
                    0x50 => a & v,
                    0x60 => a.checked_shl(v).unwrap_or(0),
                    0x70 => a.checked_shr(v).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a.checked_rem(v)?,
                    0xa0 => a ^ v,
                    _ => return None,
                }
            }
            // BPF_JMP
            0x05 => {
                let v = src(x);
                let taken = match i.code & 0xf0 {
                    0x00 => {
                        pc = pc.checked_add(i.k as usize)?;
                        continue;
                    }
                    0x10 => a == v,
                    0x20 => a > v,
                    0x30 => a >= v,
                    0x40 => a & v != 0,
                    _ => return None,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            // BPF_RET
            0x06 => {
                return match i.code & 0x18 {
                    0x00 => Some(i.k),
                    0x10 => Some(a),
                    _ => None,
                }
            }
            // BPF_MISC: TAX, TXA
            _ => match i.code & 0xf8 {
                0x00 => x = a,
                0x80 => a = x,
                _ => return None,
            },
        }
    }
    None
}

/// The action of a set of filters: the most restrictive of their answers (an unreadable
/// program counts as [`RET_KILL_PROCESS`]).
pub fn action(filters: &[Vec<Insn>], d: &SeccompData) -> u32 {
    filters
        .iter()
        .map(|p| run(p, d).map_or(RET_KILL_PROCESS, |r| r & ACTION_MASK))
        .min_by_key(|r| *r as i32)
        .unwrap_or(RET_ALLOW)
}

/// Whether an action lets the call run.
pub fn allows(action: u32) -> bool {
    action == RET_ALLOW || action == RET_LOG
}

/// The seccomp filters of `tid`, which must be in a ptrace stop of this process.
pub fn read_filters(tid: i32) -> io::Result<Vec<Vec<Insn>>> {
    let mut out = Vec::new();
    for index in 0..MAX_FILTERS {
        // SAFETY: with a null buffer PTRACE_SECCOMP_GET_FILTER only returns the filter's length.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: no filter at this index (the end, or none at all).
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n == 0 || n > MAX_INSNS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("seccomp filter {index} of task {tid} has {n} instructions"),
            ));
        }
        let mut prog = vec![
            Insn {
                code: 0,
                jt: 0,
                jf: 0,
                k: 0
            };
            n
        ];
        // SAFETY: `prog` holds `n` `sock_filter`-sized (8 bytes, repr(C)) entries, the length
        // the kernel just reported for this filter, which it copies into the buffer.
        let got = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                prog.as_mut_ptr().cast::<libc::c_void>(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        prog.truncate(usize::try_from(got).unwrap_or(0).min(n));
        out.push(prog);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn stmt(code: u16, k: u32) -> Insn {
        Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }
    const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn { code, jt, jf, k }
    }

    /// What libseccomp emits for "kill the process on `nr`, allow the rest, on x86_64 only".
    fn deny(nr: u32, ret: u32) -> Vec<Insn> {
        vec![
            stmt(0x20, 4),                       // ld [arch]
            jump(0x15, AUDIT_ARCH_X86_64, 1, 0), // jeq x86_64
            stmt(0x06, RET_KILL_PROCESS),        // ret kill
            stmt(0x20, 0),                       // ld [nr]
            jump(0x15, nr, 0, 1),                // jeq nr
            stmt(0x06, ret),                     // ret <ret>
            stmt(0x06, RET_ALLOW),               // ret allow
        ]
    }

    // x86_64 numbers: madvise 28, getpid 39.
    fn data(nr: i32, args: [u64; 6]) -> SeccompData {
        SeccompData {
            nr,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: 0x7fff_0000_1000,
            args,
        }
    }

    #[test]
    fn the_most_restrictive_filter_wins() {
        let madvise = data(28, [0x1000, 0x1000, 4, 0, 0, 0]);
        let other = data(39, [0; 6]);
        let errno = deny(28, 0x0005_0001);
        let kill = deny(28, RET_KILL_PROCESS);
        assert_eq!(action(&[], &madvise), RET_ALLOW);
        assert_eq!(action(std::slice::from_ref(&errno), &madvise), 0x0005_0000);
        assert_eq!(action(std::slice::from_ref(&errno), &other), RET_ALLOW);
        assert_eq!(action(&[errno.clone(), kill], &madvise), RET_KILL_PROCESS);
        assert!(!allows(action(&[errno], &madvise)));
        assert!(allows(RET_LOG));
        // A wrong architecture takes the kill branch.
        let mut i386 = madvise;
        i386.arch = 0x4000_0003;
        assert_eq!(action(&[deny(1, RET_ALLOW)], &i386), RET_KILL_PROCESS);
    }

    #[test]
    fn argument_words_alu_and_scratch_memory() {
        // Allow madvise only when the advice (args[2], low word) is MADV_DONTNEED (4),
        // computed through X, scratch memory and an AND.
        let prog = vec![
            stmt(0x20, 16 + 2 * 8),  // ld [args[2].lo]
            stmt(0x02, 3),           // st M[3]
            stmt(0x61, 3),           // ldx M[3]
            stmt(0x87, 0),           // txa
            stmt(0x54, 0xff),        // and #0xff
            jump(0x15, 4, 0, 1),     // jeq #4
            stmt(0x06, RET_ALLOW),   // ret allow
            stmt(0x06, 0x0005_0016), // ret errno(EINVAL)
        ];
        let nr = 28;
        assert_eq!(run(&prog, &data(nr, [0, 0, 4, 0, 0, 0])), Some(RET_ALLOW));
        assert_eq!(run(&prog, &data(nr, [0, 0, 8, 0, 0, 0])), Some(0x0005_0016));
        // The high word of an argument.
        let hi = [stmt(0x20, 16 + 4), stmt(0x16, 0)];
        assert_eq!(
            run(&hi, &data(nr, [0x1234_0000_0000, 0, 0, 0, 0, 0])),
            Some(0x1234)
        );
    }

    #[test]
    fn programs_it_cannot_follow_count_as_a_kill() {
        let d = data(0, [0; 6]);
        for prog in [
            vec![stmt(0x20, 2)],                         // unaligned load
            vec![stmt(0x20, 64), stmt(0x06, RET_ALLOW)], // past seccomp_data
            vec![stmt(0x05, 10)],                        // jump past the end
            vec![stmt(0x34, 0), stmt(0x06, RET_ALLOW)],  // divide by zero
            vec![stmt(0x28, 0), stmt(0x06, RET_ALLOW)],  // half-word load
            vec![],
        ] {
            assert_eq!(run(&prog, &d), None, "{prog:?}");
            assert_eq!(action(&[prog], &d), RET_KILL_PROCESS);
        }
    }
}
