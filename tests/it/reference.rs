//! An obviously-correct, in-memory reference of SPEC.md sections 2-4 for one tensor:
//! widen, score, sort, take k. Written independently of fapm-stages' score and threshold
//! code (only the `half` crate is shared).

use fapm_stages::dtype::DType;

pub fn bits(dtype: DType, data: &[u8], i: usize) -> u64 {
    let s = dtype.size();
    let mut b = [0u8; 8];
    b[..s].copy_from_slice(&data[i * s..(i + 1) * s]);
    u64::from_le_bytes(b)
}

pub fn widen(dtype: DType, b: u64) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_bits(b as u16).to_f32(),
        DType::F16 => half::f16::from_bits(b as u16).to_f32(),
        DType::F32 => f32::from_bits(b as u32),
        DType::F64 => f64::from_bits(b) as f32,
        d => panic!("{d} is not a float"),
    }
}

pub fn narrow(dtype: DType, x: f32) -> u64 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_bits() as u64,
        DType::F16 => half::f16::from_f32(x).to_bits() as u64,
        DType::F32 => x.to_bits() as u64,
        DType::F64 => (x as f64).to_bits(),
        d => panic!("{d} is not a float"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Metric {
    Fapm,
    Magnitude,
}

/// The scores of every position (NaN mapped to -inf), for checking tolerances.
pub fn scores(ft_dtype: DType, ft: &[u8], base_dtype: DType, base: &[u8], metric: Metric) -> Vec<f32> {
    penalised_scores(ft_dtype, ft, base_dtype, base, metric, 1.0)
}

/// [`scores`] with FAPM's penalty strength `l`: `S = |d| - l * t`, and `|d|` when `l = 0`.
pub fn penalised_scores(
    ft_dtype: DType,
    ft: &[u8],
    base_dtype: DType,
    base: &[u8],
    metric: Metric,
    l: f32,
) -> Vec<f32> {
    let n = ft.len() / ft_dtype.size();
    let pre: Vec<f32> = (0..n).map(|i| widen(base_dtype, bits(base_dtype, base, i))).collect();
    let post: Vec<f32> = (0..n).map(|i| widen(ft_dtype, bits(ft_dtype, ft, i))).collect();
    let sum: f64 = pre.iter().map(|p| p.abs() as f64).sum();
    let a = (sum / n as f64) as f32;
    (0..n)
        .map(|i| {
            let d = post[i] - pre[i];
            let s = match metric {
                Metric::Magnitude => d.abs(),
                Metric::Fapm if l == 0.0 => d.abs(),
                Metric::Fapm => {
                    let r = d.abs() / pre[i].abs();
                    let t = a * r;
                    d.abs() - l * t
                }
            };
            if s.is_nan() {
                f32::NEG_INFINITY
            } else {
                s
            }
        })
        .collect()
}

/// The base converted to the fine-tuned dtype, bit patterns.
pub fn converted(ft_dtype: DType, base_dtype: DType, base: &[u8]) -> Vec<u64> {
    let n = base.len() / base_dtype.size();
    (0..n)
        .map(|i| {
            let b = bits(base_dtype, base, i);
            if ft_dtype == base_dtype {
                b
            } else {
                narrow(ft_dtype, widen(base_dtype, b))
            }
        })
        .collect()
}

/// The expected output tensor and the kept positions. `keep` is `None` for a dense tensor.
pub fn expected(
    ft_dtype: DType,
    ft: &[u8],
    base_dtype: DType,
    base: &[u8],
    metric: Metric,
    keep: Option<u64>,
) -> (Vec<u8>, Vec<usize>) {
    expected_penalised(ft_dtype, ft, base_dtype, base, metric, 1.0, keep)
}

/// [`expected`] with FAPM's penalty strength `l`, for a fine-tuned tensor that may extend the
/// base (SPEC section 2): the prefix of the base's length is treated as a tensor of its own,
/// and the fine-tuned elements after it are copied whole. `keep` counts the prefix.
pub fn expected_penalised(
    ft_dtype: DType,
    ft: &[u8],
    base_dtype: DType,
    base: &[u8],
    metric: Metric,
    l: f32,
    keep: Option<u64>,
) -> (Vec<u8>, Vec<usize>) {
    let n = base.len() / base_dtype.size();
    let (ft, appended) = ft.split_at(n * ft_dtype.size());
    let conv = converted(ft_dtype, base_dtype, base);
    let mut cands: Vec<usize> = (0..n).filter(|&i| bits(ft_dtype, ft, i) != conv[i]).collect();
    if let Some(k) = keep {
        let s = penalised_scores(ft_dtype, ft, base_dtype, base, metric, l);
        cands.sort_by(|&x, &y| s[y].partial_cmp(&s[x]).unwrap().then(x.cmp(&y)));
        cands.truncate(k as usize);
        cands.sort();
    }
    let size = ft_dtype.size();
    let mut out = Vec::with_capacity(n * size);
    for c in &conv {
        out.extend_from_slice(&c.to_le_bytes()[..size]);
    }
    for &i in &cands {
        out[i * size..(i + 1) * size].copy_from_slice(&ft[i * size..(i + 1) * size]);
    }
    out.extend_from_slice(appended);
    (out, cands)
}

/// `floor(n * (1 - s))` for a decimal string `s`, via exact integers.
pub fn keep_count(n: u64, s: &str) -> u64 {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let den = 10u128.pow(frac.len() as u32);
    let num = int.parse::<u128>().unwrap() * den + if frac.is_empty() { 0 } else { frac.parse::<u128>().unwrap() };
    (n as u128 * (den - num) / den) as u64
}
