//! Tests of the whole report on small synthetic checkpoint pairs written by the
//! `safetensors` crate.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::stats::{Kept, MAP_SPARSITY, PENALTIES};
use super::*;

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub(super) type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes a safetensors file with the `safetensors` crate.
pub(super) fn write_safetensors(path: &Path, tensors: &[Raw]) {
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        (name.as_str(), TensorView::new(*dtype, shape.clone(), bytes).expect("a consistent tensor"))
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A deterministic xorshift generator giving floats in [-1, 1).
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect()
}

/// A base and a fine-tuned matrix: base weights whose scale varies by row, and a task
/// vector that is large on the small-weight rows (large relative changes) in places.
pub(super) fn matrix(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let mut base = Vec::with_capacity(rows * cols);
    let mut ft = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = if r % 8 < 2 { 0.002 } else { 0.05 };
        for c in 0..cols {
            let b = rng.next() * scale;
            let mut d = rng.next() * 0.004;
            if (c / 8) % 3 == 0 {
                d *= 4.0;
            }
            base.push(b);
            ft.push(if rng.next() > 0.8 { b } else { b + d });
        }
    }
    (base, ft)
}

/// Writes a pair: three 2-D matrices (F32 base, BF16 fine-tuned for one of them), a 1-D
/// norm, an integer tensor and a tensor only the fine-tuned model has.
fn write_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut base, mut ft): (Vec<Raw>, Vec<Raw>) = (Vec::new(), Vec::new());
    for (i, (r, c)) in [(64usize, 48usize), (40, 40), (17, 300)].into_iter().enumerate() {
        let (b, f) = matrix(&mut rng, r, c);
        let name = format!("layers.{i}.proj.weight");
        let shape = vec![r, c];
        base.push((name.clone(), Dtype::F32, shape.clone(), f32_bytes(&b)));
        if i == 1 {
            ft.push((name, Dtype::BF16, shape, bf16_bytes(&f)));
        } else {
            ft.push((name, Dtype::F32, shape, f32_bytes(&f)));
        }
    }
    let norm: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 0.01).collect();
    base.push(("norm.weight".into(), Dtype::F32, vec![16], f32_bytes(&norm)));
    ft.push(("norm.weight".into(), Dtype::F32, vec![16], f32_bytes(&norm)));
    let ids: Vec<u8> = (0..8i64).flat_map(|x| x.to_le_bytes()).collect();
    ft.push(("position_ids".into(), Dtype::I64, vec![8], ids));
    ft.push(("head.bias".into(), Dtype::F32, vec![4], f32_bytes(&[1.0; 4])));
    let (bp, fp) = (dir.join("base.safetensors"), dir.join("ft.safetensors"));
    write_safetensors(&bp, &base);
    write_safetensors(&fp, &ft);
    (bp, fp)
}

fn config(dir: &Path, base: PathBuf, ft: PathBuf) -> ReportConfig {
    ReportConfig {
        base,
        finetuned: ft,
        output: dir.join("report"),
        tensors: Vec::new(),
        overwrite: false,
        memory_budget: crate::config::DEFAULT_MEMORY_BUDGET,
    }
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = ::png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    (info.width, info.height)
}

#[test]
fn report_writes_every_picture_and_the_page_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path());
    let cfg = config(dir.path(), b, f);
    let summary = report(&cfg).unwrap();
    // The three matrices and the 1-D norm (unchanged); heatmaps of the matrices only.
    assert_eq!(summary.tensors_charted, 4);
    assert_eq!(summary.tensors_shown, 4);
    assert_eq!(summary.heatmap_tensors.len(), 3);
    assert_eq!(summary.files[0], cfg.output.join("index.html"));
    assert_eq!(summary.files[1], cfg.output.join("report.json"));
    // index + report.json + 3 tensors x 6 heatmaps; the charts are inside the page.
    assert_eq!(summary.files.len(), 2 + 18);
    let html = std::fs::read_to_string(&summary.files[0]).unwrap();
    // 2 whole-model charts, the trade-off chart and 2 per-tensor charts, each with its title
    // and axis labels as text.
    assert_eq!(html.matches("<svg class=\"chart\"").count(), 2 + 1 + 2);
    assert!(html.contains(">Task-vector energy kept</text>") && html.contains(">energy kept</text>"));
    assert_eq!(html.matches("<svg class=\"heatmap\"").count(), 18);
    for f in &summary.files[2..] {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(html.contains(&format!("href=\"{name}\"")), "{name} not shown");
        // Large enough to see rows and columns: the 17 x 300 matrix too.
        let (w, h) = png_size(f);
        assert!(w.max(h) >= 384 && w.min(h) >= 192, "{name}: {w}x{h}");
    }
    // Every image the page references was written.
    for part in html.split("href=\"").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(cfg.output.join(name).is_file(), "{name} missing");
    }
    // The unchanged norm reads "unchanged", never NaN; the strength is λ; the inputs are named,
    // not given by their absolute paths.
    assert!(html.contains("<td>norm.weight</td>") && html.contains("<td>unchanged</td>"));
    for bad in ["NaN", "inf<", "l = ", "l=0", dir.path().to_str().unwrap()] {
        assert!(!html.contains(bad), "the page shows {bad:?}");
    }
    assert!(html.contains("λ = 1 (FAPM)"));
    assert!(html.contains("<code>base.safetensors</code>") || html.contains("/base.safetensors</code>"));
    // Nothing is left beside the output.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("fapm-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path());
    let mut cfg = config(dir.path(), b, f);
    cfg.tensors = vec![regex::Regex::new(r"layers\.1\.").unwrap()];
    std::fs::create_dir(&cfg.output).unwrap();
    std::fs::write(cfg.output.join("stale.txt"), "x").unwrap();
    let err = report(&cfg).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    cfg.overwrite = true;
    let summary = report(&cfg).unwrap();
    assert_eq!(summary.heatmap_tensors, ["layers.1.proj.weight"]);
    assert!(!cfg.output.join("stale.txt").exists());
    assert!(cfg.output.join("index.html").is_file());
}

#[test]
fn bad_inputs_name_the_file_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path());
    let mut cfg = config(dir.path(), b.clone(), f.clone());
    cfg.tensors = vec![regex::Regex::new("nothing-like-this").unwrap()];
    let err = report(&cfg).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("nothing-like-this"));

    let missing = dir.path().join("missing.safetensors");
    let cfg = config(dir.path(), missing.clone(), f);
    let err = report(&cfg).unwrap_err().to_string();
    assert!(err.contains("missing.safetensors"), "{err}");

    let truncated = dir.path().join("short.safetensors");
    std::fs::write(&truncated, [1, 2, 3]).unwrap();
    let cfg = config(dir.path(), b, truncated);
    let err = report(&cfg).unwrap_err().to_string();
    assert!(err.contains("short.safetensors"), "{err}");
    assert!(!cfg.output.exists());
    let n = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(n, 3, "only the three inputs remain");
}

/// Opens a one-matrix pair and returns its `Pair`.
fn one_pair(dir: &Path, base: &[f32], ft: &[f32], rows: u64, cols: u64) -> Pair {
    let shape = vec![rows as usize, cols as usize];
    let (bp, fp) = (dir.join("b.safetensors"), dir.join("f.safetensors"));
    write_safetensors(&bp, &[("w".into(), Dtype::F32, shape.clone(), f32_bytes(base))]);
    write_safetensors(&fp, &[("w".into(), Dtype::F32, shape, f32_bytes(ft))]);
    let (b, f) = (Checkpoint::open(&bp).unwrap(), Checkpoint::open(&fp).unwrap());
    let mut p: Vec<Pair> = pairs(&b, &f).collect();
    assert_eq!(p.len(), 1);
    p.remove(0)
}

#[test]
fn kept_shares_are_one_at_sparsity_zero_and_never_grow() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = matrix(&mut Rng(42), 40, 50);
    let pair = one_pair(dir.path(), &b, &f, 40, 50);
    let levels = ["0", "0.1", "0.5", "0.75", "0.9", "0.95", "0.99", "1"];
    let sp: Vec<Sparsity> = levels.iter().map(|s| Sparsity::parse(s).unwrap()).collect();
    let s = stats::tensor_stats(&pair, &sp, &mut Scratch::default());
    assert!(s.candidates > 0 && s.total_d2 > 0.0);
    assert_eq!(s.kept.len(), PENALTIES.len());
    for kept in &s.kept {
        for (part, total) in [
            (kept.iter().map(|k| k.d2).collect::<Vec<_>>(), s.total_d2),
            (kept.iter().map(|k| k.rel2).collect(), s.total_rel2),
        ] {
            let fr: Vec<f64> = part.iter().map(|&p| Kept::share(p, total).unwrap()).collect();
            assert!((fr[0] - 1.0).abs() < 1e-12, "{fr:?}");
            assert_eq!(*fr.last().unwrap(), 0.0);
            assert!(fr.windows(2).all(|w| w[1] <= w[0] + 1e-12), "{fr:?}");
        }
    }
    // Exactly k positions are kept, as prune keeps them, ties or not.
    for (j, sparsity) in sp.iter().enumerate() {
        let k = sparsity.keep_count(s.n).min(s.candidates);
        for kept in &s.kept {
            assert_eq!(kept[j].count, k, "sparsity {}", levels[j]);
        }
        // Magnitude (l = 0) keeps the k largest |d|: no strength keeps more of the norm.
        for kept in &s.kept[1..] {
            assert!(kept[j].d2 <= s.kept[0][j].d2 * (1.0 + 1e-12), "sparsity {}", levels[j]);
        }
    }
    // FAPM trades a little energy for much less of the forgetting proxy.
    let j = 4; // 0.9
    let [mag, fapm] = stats::MAP_PENALTIES.map(|l| &s.kept[l][j]);
    assert!(mag.d2 >= fapm.d2);
    assert!(fapm.rel2 < 0.5 * mag.rel2, "{fapm:?} {mag:?}");
}

#[test]
fn magnitude_curve_matches_a_sort() {
    // Distinct powers of two land in distinct bins, so the bins are exact here.
    let n = 64usize;
    let base = vec![1.0f32; n];
    let ft: Vec<f32> = (0..n).map(|i| 1.0 + (2f32).powi(i as i32 % 20 - 10)).collect();
    let dir = tempfile::tempdir().unwrap();
    let pair = one_pair(dir.path(), &base, &ft, 8, 8);
    let sp = [Sparsity::parse("0.75").unwrap()];
    let s = stats::tensor_stats(&pair, &sp, &mut Scratch::default());
    let mut d2: Vec<f64> = (0..n)
        .map(|i| {
            let d = (ft[i] - base[i]) as f64;
            d * d
        })
        .collect();
    d2.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = d2.iter().sum();
    let top: f64 = d2[..16].iter().sum();
    let got = Kept::share(s.kept[0][0].d2, s.total_d2).unwrap();
    assert!((got - top / total).abs() < 1e-9, "{got}");
    assert_eq!(s.kept[0][0].count, 16);
}

#[test]
fn heatmap_blocks_cover_a_tensor_larger_than_a_chunk() {
    let (rows, cols) = (1030u64, 1031u64);
    let n = (rows * cols) as usize;
    assert!(n > stats::CHUNK);
    let base: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 + 1.0) * 1e-3).collect();
    let ft: Vec<f32> = base.iter().map(|b| b * 1.5).collect();
    let dir = tempfile::tempdir().unwrap();
    let pair = one_pair(dir.path(), &base, &ft, rows, cols);
    let s = stats::tensor_stats(&pair, &[], &mut Scratch::default());
    let grid = heatmap::accumulate(&pair, s.mean, s.map_cut, &mut Scratch::default());
    assert_eq!((grid.gh, grid.gw), (767, 768));
    // Every relative change is 0.5, so every block's mean is 0.5.
    let rel = grid.values(Quantity::Relative);
    assert!(rel.iter().all(|v| (v - 0.5).abs() < 1e-6));
    // The kept shares average to 10% over the matrix (blocks are near-equal in size).
    let kept = grid.values(Quantity::KeptFapm);
    let mean = kept.iter().sum::<f64>() / kept.len() as f64;
    assert!((mean - 0.1).abs() < 0.01, "{mean}");
}

/// One changed row and one changed column of a 1536 x 384 matrix stand out in the |dW| map
/// as lines of their own, against the dark rest.
#[test]
fn a_changed_row_and_column_are_visible() {
    let (rows, cols) = (1536u64, 384u64);
    let base = vec![0.5f32; (rows * cols) as usize];
    let ft: Vec<f32> = (0..rows * cols)
        .map(|i| match (i / cols, i % cols) {
            (700, _) | (_, 100) => 0.75,
            _ => 0.5 + 1.0 / 1024.0,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let pair = one_pair(dir.path(), &base, &ft, rows, cols);
    let s = stats::tensor_stats(&pair, &[], &mut Scratch::default());
    let grid = heatmap::accumulate(&pair, s.mean, s.map_cut, &mut Scratch::default());
    let picture = heatmap::render(&grid, Quantity::DeltaAbs, None);
    assert_eq!((picture.width, picture.height), (384, 768));
    let (row_y, col_x) = (700 * 768 / 1536, 100);
    // The bulk takes the bottom colour; the column the top one; the row (averaged with its
    // unchanged neighbour in one block) near it.
    let dark = picture.pixel(300, 600);
    assert_eq!(dark, [68, 1, 84]);
    assert_eq!(picture.pixel(col_x, 10), [253, 231, 37]);
    let row = picture.pixel(10, row_y);
    assert_eq!(row, picture.pixel(300, row_y));
    assert!(row[1] > 200, "{row:?}");
    assert_eq!(picture.pixel(10, row_y + 2), dark);
}

/// The kept maps show exactly the positions `prune --threshold approx` keeps: on a matrix
/// small enough for one block per element, a block is kept (1) or not (0) as the position
/// is in the applied model.
#[test]
fn kept_maps_are_what_prune_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (40u64, 50u64);
    // Few distinct values: many equal scores, so the boundary bin is shared.
    let base: Vec<f32> = (0..rows * cols).map(|i| [0.5f32, 0.25, 1.0, 2.0][(i % 4) as usize]).collect();
    let ft: Vec<f32> = base.iter().enumerate().map(|(i, &b)| if i % 3 == 0 { b } else { b + 0.125 }).collect();
    let pair = one_pair(dir.path(), &base, &ft, rows, cols);
    let s = stats::tensor_stats(&pair, &[], &mut Scratch::default());
    let grid = heatmap::accumulate(&pair, s.mean, s.map_cut, &mut Scratch::default());
    assert_eq!((grid.gh, grid.gw), (rows as usize, cols as usize));
    let bytes = prune_and_apply(dir.path(), "1", MAP_SPARSITY);
    let kept = grid.values(Quantity::KeptFapm);
    let mut n = 0;
    for (i, (&b, &f)) in base.iter().zip(&ft).enumerate() {
        let got = f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let by_prune = b != f && got == f;
        assert_eq!(kept[i] == 1.0, by_prune, "position {i}");
        n += by_prune as u64;
    }
    assert_eq!(n, Sparsity::parse(MAP_SPARSITY).unwrap().keep_count(rows * cols));
}

/// Prunes `b.safetensors` / `f.safetensors` in `dir` with `prune --threshold approx
/// --penalty L --sparsity S`, applies the delta and returns the bytes of tensor `w`.
fn prune_and_apply(dir: &Path, penalty: &str, sparsity: &str) -> Vec<u8> {
    let ctl = RunControl::default();
    let delta = dir.join("d.fapm");
    let prune = crate::config::PruneConfig {
        base: dir.join("b.safetensors"),
        finetuned: dir.join("f.safetensors"),
        output: delta.clone(),
        sparsity: crate::config::sparsity(sparsity).unwrap(),
        sparsity_for: Vec::new(),
        metric: crate::config::metric("fapm").unwrap(),
        penalty: crate::config::penalty(penalty).unwrap(),
        threshold: crate::config::threshold("approx").unwrap(),
        include: Vec::new(),
        exclude: Vec::new(),
        threads: 1,
        memory_budget: crate::config::DEFAULT_MEMORY_BUDGET,
        overwrite: true,
        block_elems: fapm_stages::format::BLOCK_ELEMS,
        part: None,
        base_repo: None,
        finetuned_repo: None,
    };
    crate::prune(&prune, &ctl).unwrap();
    let out = dir.join("out.safetensors");
    let apply = crate::config::ApplyConfig {
        base: Some(prune.base.clone()),
        delta,
        hub: crate::hub::Env::read(|_| None),
        output: Some(out.clone()),
        threads: 1,
        memory_budget: crate::config::DEFAULT_MEMORY_BUDGET,
        overwrite: true,
    };
    crate::apply(&apply, &ctl).unwrap();
    let applied = Checkpoint::open(&out).unwrap();
    let bytes = applied.get("w").unwrap().bytes().to_vec();
    bytes
}

/// Every strength's curve point is what `prune --penalty L` keeps at that sparsity: the same
/// number of positions and the same `sum d^2`, on a matrix with many ties and on one without.
#[test]
fn every_strength_keeps_what_prune_with_that_penalty_keeps() {
    let (rows, cols) = (40u64, 50u64);
    let tied: Vec<f32> = (0..rows * cols).map(|i| [0.5f32, 0.25, 1.0, 2.0][(i % 4) as usize]).collect();
    let tied_ft: Vec<f32> = tied.iter().enumerate().map(|(i, &b)| if i % 3 == 0 { b } else { b + 0.125 }).collect();
    for (base, ft) in [(tied, tied_ft), matrix(&mut Rng(5), rows as usize, cols as usize)] {
        let dir = tempfile::tempdir().unwrap();
        let pair = one_pair(dir.path(), &base, &ft, rows, cols);
        let sp: Vec<Sparsity> = SPARSITIES.iter().map(|s| Sparsity::parse(s).unwrap()).collect();
        let s = stats::tensor_stats(&pair, &sp, &mut Scratch::default());
        for (l, penalty) in PENALTIES.iter().enumerate() {
            for (j, sparsity) in SPARSITIES.iter().enumerate() {
                let bytes = prune_and_apply(dir.path(), penalty, sparsity);
                let mut want = stats::Kept::default();
                for (i, (&b, &f)) in base.iter().zip(&ft).enumerate() {
                    let got = f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
                    if b != f && got == f {
                        let d = f - b;
                        let r = ((d as f64).abs() / (b as f64).abs()).min(1.0);
                        want.add_position((d as f64) * (d as f64), r * r);
                    }
                }
                let got = &s.kept[l][j];
                assert_eq!((got.count, got.d2), (want.count, want.d2), "--penalty {penalty} --sparsity {sparsity}");
                assert!((got.rel2 - want.rel2).abs() <= 1e-12 * want.rel2, "--penalty {penalty} --sparsity {sparsity}");
            }
        }
    }
}

/// An extended tensor (rows appended, a resized vocabulary) is charted by its base-shaped
/// part, which is what prune scores; the page says how many rows are appended.
#[test]
fn extended_tensors_are_charted_by_their_base_part() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols, added) = (32usize, 24usize, 5usize);
    let (b, mut f) = matrix(&mut Rng(11), rows, cols);
    f.extend((0..added * cols).map(|i| i as f32 * 1e-3));
    let (bp, fp) = (dir.path().join("b.safetensors"), dir.path().join("f.safetensors"));
    write_safetensors(&bp, &[("embed.weight".into(), Dtype::F32, vec![rows, cols], f32_bytes(&b))]);
    write_safetensors(&fp, &[("embed.weight".into(), Dtype::F32, vec![rows + added, cols], f32_bytes(&f))]);
    let (base, ft) = (Checkpoint::open(&bp).unwrap(), Checkpoint::open(&fp).unwrap());
    let pairs: Vec<Pair> = pairs(&base, &ft).collect();
    assert_eq!(pairs.len(), 1);
    assert_eq!((pairs[0].rows, pairs[0].cols, pairs[0].appended_rows), (rows as u64, cols as u64, added as u64));
    let sp = [Sparsity::parse("0.9").unwrap()];
    let s = stats::tensor_stats(&pairs[0], &sp, &mut Scratch::default());
    assert_eq!(s.n, (rows * cols) as u64);
    let changed = b.iter().zip(&f).filter(|(b, f)| b != f).count() as u64;
    assert_eq!(s.candidates, changed);
    assert_eq!(s.kept[0][0].count, sp[0].keep_count(s.n));

    let summary = report(&config(dir.path(), bp, fp)).unwrap();
    assert_eq!((summary.tensors_charted, summary.extended_tensors), (1, 1));
    let html = std::fs::read_to_string(&summary.files[0]).unwrap();
    assert!(html.contains("embed.weight (+5 rows)"), "the facts name the extended tensor");
    assert!(html.contains("32 x 24 (+5 appended rows"), "the heatmaps and the table give its shape");
}

/// The trade-off chart has one point per (strength, sparsity), each naming the flags that
/// give it, and the table lists them all with the Pareto points marked.
#[test]
fn the_tradeoff_chart_names_the_flags_of_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path());
    let summary = report(&config(dir.path(), b, f)).unwrap();
    let html = std::fs::read_to_string(&summary.files[0]).unwrap();
    let start = html.find(">Trade-off: energy kept against forgetting</text>").expect("the trade-off chart");
    let chart = &html[start..start + html[start..].find("</svg>").unwrap()];
    assert_eq!(
        chart.matches("<circle r=").count() + chart.matches("<circle cx=").count(),
        PENALTIES.len() * SPARSITIES.len()
    );
    let pareto = summary.points.iter().filter(|p| p.pareto).count();
    assert!((2..25).contains(&pareto), "a frontier of several points, and points it dominates: {pareto}");
    assert_eq!(chart.matches("class=\"mark\"").count(), pareto, "the Pareto points are ringed");
    for l in PENALTIES {
        for s in SPARSITIES {
            let flags = format!("--penalty {l} --sparsity {s}");
            assert!(chart.contains(&format!("; fapm prune {flags}</title>")), "{flags} in the chart");
        }
    }
    // The table: a row per sparsity, a column per strength, the Pareto points starred; the
    // others name a point that dominates them when hovered.
    let table = &html[html.find("<th>sparsity</th>").expect("the trade-off table")..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table.matches("<tr>").count(), SPARSITIES.len());
    assert_eq!(table.matches(" ★</td>").count(), pareto);
    assert_eq!(chart.matches(", dominated by λ = ").count(), PENALTIES.len() * SPARSITIES.len() - pareto);
    assert!(html.contains(&format!("{pareto} of the 25 points are Pareto-optimal")));
}

/// `report.json`'s Pareto marks are those of a brute-force comparison of every point with
/// every other on the three measures, and its numbers are the whole model's sums.
#[test]
fn report_json_marks_the_pareto_points_a_brute_force_finds() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path());
    let summary = report(&config(dir.path(), b, f)).unwrap();
    let text = std::fs::read_to_string(&summary.files[1]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["fapm_report"], 1);
    // A file is named by its directory and its name.
    let tmp = dir.path().file_name().unwrap().to_str().unwrap();
    assert_eq!(v["base"].as_str().unwrap(), format!("{tmp}/base.safetensors"));
    assert_eq!(v["finetuned"].as_str().unwrap(), format!("{tmp}/ft.safetensors"));
    assert!(!text.contains(dir.path().to_str().unwrap()), "no absolute path");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), PENALTIES.len() * SPARSITIES.len());
    let num = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap();
    for (i, p) in points.iter().enumerate() {
        let dominated = points.iter().any(|q| {
            let ge = num(q, "energy_kept") >= num(p, "energy_kept") && num(q, "forgetting") <= num(p, "forgetting");
            ge && (num(q, "energy_kept") > num(p, "energy_kept") || num(q, "forgetting") < num(p, "forgetting"))
        });
        assert_eq!(p["pareto"].as_bool(), Some(!dominated), "point {i}: {p}");
        assert!(
            PENALTIES.contains(&p["penalty"].as_str().unwrap())
                && SPARSITIES.contains(&p["sparsity"].as_str().unwrap())
        );
        let (e, fg) = (num(p, "energy_kept"), num(p, "forgetting"));
        assert!((0.0..=1.0).contains(&e) && (0.0..=1.0).contains(&fg), "{p}");
        assert!(p["delta_bytes"].as_u64().unwrap() > 0);
    }
    // More kept, more of both, and a larger delta; magnitude keeps the most energy.
    for l in 0..PENALTIES.len() {
        let at = |j: usize| &points[j * PENALTIES.len() + l];
        for j in 1..SPARSITIES.len() {
            assert!(num(at(j), "energy_kept") <= num(at(j - 1), "energy_kept"));
            assert!(num(at(j), "forgetting") <= num(at(j - 1), "forgetting"));
            assert!(at(j)["delta_bytes"].as_u64() <= at(j - 1)["delta_bytes"].as_u64());
        }
    }
    for j in 0..SPARSITIES.len() {
        let row = &points[j * PENALTIES.len()..(j + 1) * PENALTIES.len()];
        assert!(row.iter().all(|p| num(p, "energy_kept") <= num(&row[0], "energy_kept") + 1e-12));
        assert!(num(&row[4], "forgetting") < num(&row[0], "forgetting"), "the strongest penalty forgets less");
    }
}

/// The delta size of a point is what prune writes, to within the manifest and the block
/// framing: a pair large enough for the kept values to dominate.
#[test]
fn delta_sizes_are_close_to_what_prune_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (512usize, 768usize);
    let (b, f) = matrix(&mut Rng(3), rows, cols);
    let (bp, fp) = (dir.path().join("b.safetensors"), dir.path().join("f.safetensors"));
    write_safetensors(&bp, &[("w".into(), Dtype::F32, vec![rows, cols], f32_bytes(&b))]);
    write_safetensors(&fp, &[("w".into(), Dtype::F32, vec![rows, cols], f32_bytes(&f))]);
    let summary = report(&config(dir.path(), bp, fp)).unwrap();
    for p in summary.points.iter().filter(|p| p.sparsity == "0.9" || p.sparsity == "0.5") {
        prune_and_apply(dir.path(), p.penalty, p.sparsity);
        let real = std::fs::metadata(dir.path().join("d.fapm")).unwrap().len() as f64;
        let ratio = p.delta_bytes as f64 / real;
        assert!((0.8..1.1).contains(&ratio), "{}: estimated {} bytes, prune wrote {real}", p.label(), p.delta_bytes);
    }
}

/// Renders a sample report to `$FAPM_REPORT_SAMPLE` for looking at the pictures:
/// `FAPM_REPORT_SAMPLE=/tmp/sample cargo test --lib render_sample -- --ignored`.
#[test]
#[ignore]
fn render_sample_report() {
    let out = PathBuf::from(std::env::var("FAPM_REPORT_SAMPLE").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let (mut base, mut ft): (Vec<Raw>, Vec<Raw>) = (Vec::new(), Vec::new());
    for layer in 0..6 {
        for (part, r, c) in [("q_proj", 384, 384), ("up_proj", 1536, 384)] {
            let (b, f) = matrix(&mut rng, r, c);
            let name = format!("model.layers.{layer}.{part}.weight");
            let shape = vec![r, c];
            base.push((name.clone(), Dtype::BF16, shape.clone(), bf16_bytes(&b)));
            ft.push((name, Dtype::BF16, shape, bf16_bytes(&f)));
        }
    }
    let (bp, fp) = (dir.path().join("b.safetensors"), dir.path().join("f.safetensors"));
    write_safetensors(&bp, &base);
    write_safetensors(&fp, &ft);
    let cfg = ReportConfig {
        base: bp,
        finetuned: fp,
        output: out,
        tensors: Vec::new(),
        overwrite: true,
        memory_budget: crate::config::DEFAULT_MEMORY_BUDGET,
    };
    let s = report(&cfg).unwrap();
    eprintln!("{s:#?}");
}

/// The page and `report.json` name the inputs as people know them, never by absolute path.
#[test]
fn inputs_are_named_not_located() {
    let cases = [
        ("/home/me/models/Llama-3-8B/", "Llama-3-8B"),
        ("/data/ft/model.safetensors", "ft/model.safetensors"),
        ("model.safetensors", "model.safetensors"),
        ("/root/.cache/huggingface/hub/models--org--name-v2/snapshots/0123abcd", "org/name-v2"),
        ("./out/", "out"),
        ("/", "."),
    ];
    for (path, want) in cases {
        assert_eq!(display_name(Path::new(path)), want, "{path}");
    }
}

/// The workers count tensors within half the budget, one per core at most, one at least.
#[test]
fn the_budget_bounds_the_workers() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(workers(0), 1);
    let per_worker = stats::scratch_bytes(PENALTIES.len()) + (PENALTIES.len() as u64 + 1) * (512 << 10);
    // The minimum budget, 64M: one worker beside the heatmap; the default, 256M: every core of
    // a small machine.
    assert_eq!(workers(64 << 20), 1);
    assert!(heatmap::GRID_BYTES + per_worker <= 32 << 20);
    assert_eq!(workers(crate::config::DEFAULT_MEMORY_BUDGET), cores.min(13));
    assert_eq!(workers(64 << 30), cores);
}
