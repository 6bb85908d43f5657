//! The best generic lossless alternative to a fapm delta: the pruned model's bits XOR the
//! base's bits, tensor by tensor, with the high and low byte of every 2-byte element (bytes
//! 3..0 of 4-byte ones, and so on) in separate streams, each compressed with zstd level 3.
//!
//! ```text
//! cargo run --release --example xor_baseline -- BASE PRUNED
//! ```
//!
//! Prints one JSON line: the compressed size of every byte plane and the total. Tensors
//! only the pruned model has are XORed against zeros (stored as they are).

use std::io::Write;
use std::path::PathBuf;

use fapm_stages::checkpoint::Checkpoint;

/// Bytes XORed at a time.
const CHUNK: usize = 8 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [base, pruned] = args.as_slice() else {
        eprintln!("usage: xor_baseline BASE PRUNED");
        std::process::exit(2);
    };
    let base = Checkpoint::open(base)?;
    let pruned = Checkpoint::open(pruned)?;
    // One zstd stream per byte plane (most significant first), up to 8 planes.
    let mut planes: Vec<zstd::stream::Encoder<'static, Counter>> = Vec::new();
    let mut buf: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0u64;
    let mut nonzero = 0u64;
    for t in pruned.tensors() {
        let info = t.info();
        let size = info.dtype.size();
        let p = t.bytes();
        let b = base.get(&info.name).filter(|b| b.info().dtype == info.dtype && b.info().shape == info.shape);
        while planes.len() < size {
            planes.push(zstd::stream::Encoder::new(Counter(0), 3)?);
            buf.push(Vec::new());
        }
        for start in (0..p.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(p.len());
            let n = (end - start) / size;
            for v in &mut buf[..size] {
                v.clear();
                v.resize(n, 0);
            }
            let pc = &p[start..end];
            let bc = b.as_ref().map(|b| &b.bytes()[start..end]);
            for i in 0..n {
                let mut any = 0u8;
                for j in 0..size {
                    let x = pc[i * size + j] ^ bc.map_or(0, |bc| bc[i * size + j]);
                    any |= x;
                    buf[size - 1 - j][i] = x; // little-endian: the last byte is the high one
                }
                nonzero += (any != 0) as u64;
            }
            for (enc, v) in planes.iter_mut().zip(&buf[..size]) {
                enc.write_all(v)?;
            }
            bytes += (end - start) as u64;
        }
    }
    let sizes: Vec<u64> = planes.into_iter().map(|e| e.finish().map(|c| c.0)).collect::<Result<_, _>>()?;
    let total: u64 = sizes.iter().sum();
    println!(
        "{}",
        serde_json::json!({ "tensor_bytes": bytes, "changed_elements": nonzero, "plane_bytes": sizes, "total_bytes": total })
    );
    Ok(())
}

/// A writer that only counts.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
