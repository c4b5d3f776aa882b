//! The `flood` section's TC classifier, as instructions, and the two `bpf(2)` commands it
//! needs that aya does not offer for a program outside an object file: load
//! (`BPF_PROG_LOAD`) and attach to TC ingress (`BPF_LINK_CREATE`, TCX).
//!
//! [`tc_prefilter`] does what weir's XDP prefilter does for an IPv4 source, on the very same
//! maps: one lookup in the `PREFILTER` trie, on a hit the entry's and the reason's drop
//! counters, then `TC_ACT_SHOT`. weir's own TC ingress program (`from_network`) has no
//! prefilter lookup, so this is the TC figure the XDP one is compared with.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result, bail};

/// One eBPF instruction, as `struct bpf_insn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R10: u8 = 10;

// Opcodes (classes, sizes and operations combined, from `linux/bpf.h`).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_DW: u8 = 0x79;
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const ST_W: u8 = 0x62;
const ADD_IMM: u8 = 0x07;
const MOV_IMM: u8 = 0xb7;
const MOV_REG: u8 = 0xbf;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const JGT_REG: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// Offsets in the frame: Ethernet type, IPv4 source address; the end of the IPv4 header (no
/// options).
const ETH_TYPE: i16 = 12;
const IP_SRC: i16 = 26;
const IP_END: i32 = 34;

fn ld_map_fd(dst: u8, fd: RawFd) -> [Insn; 2] {
    [
        insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The denied prefixes: `count` prefixes of `2^(32 − len)` addresses each, back to back
/// from `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefixes {
    pub base: u32,
    pub len: u8,
    pub count: u32,
}

impl Prefixes {
    pub fn step(&self) -> u32 {
        1 << (32 - u32::from(self.len))
    }

    /// The `i`-th prefix's network address.
    pub fn network(&self, i: u32) -> u32 {
        self.base + i * self.step()
    }
}

/// The TC equivalent of the XDP prefilter on weir's maps (`PREFILTER`: LPM trie of
/// `{prefix_len, IpKey}` to the entry's id; `PREFILTER_DROPS` and `DROPS`: per-CPU
/// counters by entry id and by drop reason).
pub fn tc_prefilter(
    prefilter: RawFd,
    prefilter_drops: RawFd,
    drops: RawFd,
    reason: u32,
) -> Vec<Insn> {
    // `::ffff:0:0/96` as the third word of an IPv4-mapped IpKey, read natively.
    let v4_mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]) as i32;
    let mut p = vec![
        insn(LDX_W, R7, R1, 76, 0), // r7 = __sk_buff.data
        insn(LDX_W, R8, R1, 80, 0), // r8 = __sk_buff.data_end
        insn(MOV_REG, R2, R7, 0, 0),
        insn(ADD_IMM, R2, 0, 0, IP_END),
        insn(JGT_REG, R2, R8, 0, 0), // → pass (patched below)
        insn(LDX_H, R2, R7, ETH_TYPE, 0),
        insn(JNE_IMM, R2, 0, 0, 0x0008), // not IPv4 (0x0800 read natively) → pass
        insn(LDX_W, R2, R7, IP_SRC, 0),
        // The trie key on the stack at r10 − 20: prefix length 128, the IpKey.
        insn(ST_W, R10, 0, -20, 128),
        insn(ST_W, R10, 0, -16, 0),
        insn(ST_W, R10, 0, -12, 0),
        insn(ST_W, R10, 0, -8, v4_mapped),
        insn(STX_W, R10, R2, -4, 0),
    ];
    p.extend(ld_map_fd(R1, prefilter));
    p.extend([
        insn(MOV_REG, R2, R10, 0, 0),
        insn(ADD_IMM, R2, 0, 0, -20),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        insn(JEQ_IMM, R0, 0, 0, 0), // no entry → pass (patched below)
        insn(LDX_W, R6, R0, 0, 0),  // r6 = entry id
        insn(ST_W, R10, 0, -24, 0),
        insn(STX_W, R10, R6, -24, 0),
    ]);
    p.extend(count(prefilter_drops, -24));
    p.extend([insn(ST_W, R10, 0, -24, reason as i32)]);
    p.extend(count(drops, -24));
    p.extend([insn(MOV_IMM, R0, 0, 0, TC_ACT_SHOT), insn(EXIT, 0, 0, 0, 0)]);
    let pass = p.len();
    p.extend([insn(MOV_IMM, R0, 0, 0, TC_ACT_OK), insn(EXIT, 0, 0, 0, 0)]);
    // Patch the jumps to `pass` (the two bounds/type checks and the missed lookup).
    for (i, x) in p.iter_mut().enumerate().take(pass) {
        if matches!(x.code, JGT_REG | JNE_IMM | JEQ_IMM) && x.off == 0 {
            x.off = (pass - i - 1) as i16;
        }
    }
    p
}

/// Adds one to the per-CPU `u64` at the `u32` key stored at `r10 + key_off`, if present.
fn count(map: RawFd, key_off: i16) -> Vec<Insn> {
    let mut p = Vec::new();
    p.extend(ld_map_fd(R1, map));
    p.extend([
        insn(MOV_REG, R2, R10, 0, 0),
        insn(ADD_IMM, R2, 0, 0, i32::from(key_off)),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        insn(JEQ_IMM, R0, 0, 3, 0),
        insn(LDX_DW, R1, R0, 0, 0),
        insn(ADD_IMM, R1, 0, 0, 1),
        insn(STX_DW, R0, R1, 0, 0),
    ]);
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `union bpf_attr` prefix of the given size for `cmd`, whose
    // pointers (if any) point at live buffers of the sizes it states.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// A loaded program; unloaded when the last reference (fd or link) goes.
pub struct Program(OwnedFd);

impl Program {
    fn load(prog_type: u32, name: &str, insns: &[Insn]) -> Result<Self> {
        let mut code = Vec::with_capacity(insns.len() * 8);
        for i in insns {
            code.push(i.code);
            code.push(i.regs);
            code.extend(i.off.to_le_bytes());
            code.extend(i.imm.to_le_bytes());
        }
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let mut attr = ProgLoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name,
            ..Default::default()
        };
        match bpf(BPF_PROG_LOAD, &mut attr) {
            // SAFETY: a new fd the kernel returned, owned by no one else.
            Ok(fd) => Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "loading the {name} program: {e}; verifier log:\n{}",
                    String::from_utf8_lossy(&log[..end])
                )
            }
        }
    }

    pub fn load_classifier(name: &str, insns: &[Insn]) -> Result<Self> {
        Self::load(BPF_PROG_TYPE_SCHED_CLS, name, insns)
    }

    /// Attaches the classifier to TC ingress (TCX) of interface `ifindex` of the calling
    /// thread's namespace; detached when the returned link is dropped.
    pub fn attach_tcx_ingress(&self, ifindex: u32) -> Result<OwnedFd> {
        let mut attr = LinkCreateAttr {
            prog_fd: self.0.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_TCX_INGRESS,
            ..Default::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr).with_context(|| {
            format!("attaching a classifier to TCX ingress of ifindex {ifindex}")
        })?;
        // SAFETY: a new fd the kernel returned, owned by no one else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_back_to_back() {
        let p = Prefixes {
            base: u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)),
            len: 28,
            count: 100_000,
        };
        assert_eq!(p.step(), 16);
        assert_eq!(
            std::net::Ipv4Addr::from(p.network(1) + 1),
            std::net::Ipv4Addr::new(100, 64, 0, 17)
        );
        assert!(p.network(p.count) <= u32::from(std::net::Ipv4Addr::new(100, 127, 255, 255)));
    }

    #[test]
    fn the_classifiers_jumps_land_on_its_end() {
        let p = tc_prefilter(3, 4, 5, 14);
        let pass = p.len() - 2;
        let mut targets = 0;
        for (i, x) in p.iter().enumerate() {
            if matches!(x.code, JGT_REG | JNE_IMM) || (x.code == JEQ_IMM && x.off > 3) {
                assert_eq!(i + 1 + x.off as usize, pass, "jump at {i}");
                targets += 1;
            }
        }
        assert_eq!(targets, 3);
        assert_eq!(p[pass].imm, TC_ACT_OK);
    }
}
