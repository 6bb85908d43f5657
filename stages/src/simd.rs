//! Running a portable loop on the widest vector instructions the CPU has.
//!
//! The hot loops are written once, portably, and inlined; [`widest`] runs one inside a
//! function compiled for AVX-512 (or AVX2), chosen at run time, where the compiler vectorizes
//! it for those lanes. The operations are the same, so the results are the same bits: only
//! the width changes. The key loop, the mean's sum, the histograms and the boundary count go
//! through it.

/// Calls `f` compiled for AVX-512 (F, BW, VL), or AVX2, when the CPU has them; else as it
/// is. Whatever `f` inlines is vectorized for those instructions. `f` must be an
/// `#[inline(always)]` closure: one that is not inlined (a large body: it has three call sites
/// here) is compiled once, for the baseline, and only called from the wider copies.
#[inline(always)]
pub fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512 F, BW and VL, checked just above.
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Whether the CPU has what [`widest`]'s AVX-512 copy is compiled for (F, BW, VL).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// `f` at every width this CPU runs (portable first, then AVX2, then AVX-512), named: for
/// tests that check each copy against the portable one, whichever [`widest`] picks here.
#[cfg(test)]
pub(crate) fn each_width<R>(f: impl Fn() -> R) -> Vec<(&'static str, R)> {
    #[allow(unused_mut)]
    let mut all = vec![("portable", f())];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            all.push(("avx2", unsafe { avx2(&f) }));
        }
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512 F, BW and VL, checked just above.
            all.push(("avx512", unsafe { avx512(&f) }));
        }
    }
    all
}

/// Asks for every cache line of `bytes` to be brought into the cache, without waiting.
#[inline(always)]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: the address is inside `bytes`; a prefetch reads nothing and cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
