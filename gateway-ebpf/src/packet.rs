//! Bounds-checked packet access. Every read of packet memory goes through [`ptr_at`], which the
//! verifier can follow: the check against `data_end` sits right next to the pointer it guards.

use aya_ebpf::programs::XdpContext;

/// Pointer to a `T` at `offset` bytes into the frame, or `None` if it would reach past the end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Copies a `T` from `offset`. At variable offsets read several bytes at once: LLVM turns the
/// bounds check of a one-byte read into `p + off >= end`, from which the verifier learns no range.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes are inside the frame; T is plain bytes.
    Some(unsafe { core::ptr::read_unaligned(p) })
}

/// Reads a big-endian u16 at `offset`.
#[inline(always)]
pub fn be16_at(ctx: &XdpContext, offset: usize) -> Option<u16> {
    let p = ptr_at::<[u8; 2]>(ctx, offset)?;
    // SAFETY: ptr_at checked that two bytes are inside the frame.
    Some(u16::from_be_bytes(unsafe { *p }))
}

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
