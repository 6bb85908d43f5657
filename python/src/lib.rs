//! `fapm._fapm`: the Rust half of the Python package, a thin layer over the `fapm` library.
//!
//! Tensors cross as flat NumPy byte arrays (the Python half views them with their dtype and
//! shape), results are handed to NumPy without a copy, the GIL is released while Rust works
//! on a worker thread, and Ctrl-C (checked every 50 ms) cancels it as it cancels the command
//! line; the commands report their progress to a Python callback at the same pace. Settings are checked by `fapm::config`, the command line's own checks, and tensors
//! are rebuilt by the decoder `apply` uses. Every fapm error becomes `FapmError` with the
//! message the command line prints, escaped as it escapes it.
//!
//! Nothing is allocated from a size the delta declares before it was bounded: a tensor built
//! on a base only after the base was checked against the record (dtype, shape, bytes), bytes
//! that no base bounds (a tensor stored whole, the added rows of an extended one) only within
//! [`unbounded_limit`], and every output buffer with a fallible allocation. Buffers that may be
//! memory-mapped files are watched for SIGBUS while Rust reads them (`sigbus`).

mod sigbus;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fapm::config::{options, ApplyConfig, InspectConfig, VerifyConfig};
use fapm::{Error, RunControl};
use fapm_stages::bounded_json::{self as json, RunMemory};
use fapm_stages::checkpoint::Checkpoint as RustCheckpoint;
use fapm_stages::decode::in_memory::Delta as RustDelta;
use fapm_stages::error::one_line;
use fapm_stages::format::TensorRecord;
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyAny, PyList};

create_exception!(
    _fapm,
    FapmError,
    PyException,
    "A fapm failure: bad input, a hash mismatch, a corrupt delta. The message is the one the fapm command line prints after `error:`."
);

/// A fapm error as a Python exception: the interruption that stopped the work when there was
/// one (KeyboardInterrupt), else `FapmError` with the command line's message.
fn to_py(e: Error, interrupted: Option<PyErr>) -> PyErr {
    match (e, interrupted) {
        (Error::Cancelled, Some(py)) => py,
        (e, _) => FapmError::new_err(one_line(&e.to_string())),
    }
}

/// The error for a buffer whose file shrank while Rust read it (`sigbus`): `label` names it.
fn truncated(label: &Path) -> PyErr {
    to_py(Error::invalid(label, "changed or was truncated while fapm was reading it (memory-mapped)"), None)
}

/// How many times its compressed bytes a tensor's bytes that no base bounds may be: more than
/// honest tensors compress (floats about 1.1-2, integers rarely 10), far less than a block of
/// zeros does (thousands).
const UNBOUNDED_RATIO: u64 = 64;

/// The most bytes that no base bounds (a tensor stored whole, the added rows of an extended
/// tensor) that may be allocated for record `t`: the memory budget, or [`UNBOUNDED_RATIO`]
/// times the compressed bytes of its blocks if that is more. The reader has checked that the
/// blocks decompress to the tensor's bytes, but a zstd block of zeros is 64 MiB from a few
/// KiB: without this a delta of kilobytes could ask for gigabytes.
fn unbounded_limit(t: &TensorRecord, budget: u64) -> u64 {
    let packed: u64 = t.blocks.iter().map(|b| b.len).fold(0, u64::saturating_add);
    budget.max(packed.saturating_mul(UNBOUNDED_RATIO))
}

/// Runs `f` on a worker thread with the GIL released; Ctrl-C (checked every 50 ms) cancels it
/// at its next block or chunk, and the KeyboardInterrupt is raised once it stopped.
fn pipeline<T: Send>(py: Python<'_>, f: impl FnOnce(&RunControl) -> fapm::Result<T> + Send) -> PyResult<T> {
    reporting(py, None, f)
}

/// [`pipeline`], telling `progress` how far the work is: `progress(done, total, current)`
/// (input bytes, `total` 0 while unknown, and the tensor being worked on) every 50 ms and
/// once more when it has finished. An exception it raises cancels the work, as Ctrl-C does.
fn reporting<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    f: impl FnOnce(&RunControl) -> fapm::Result<T> + Send,
) -> PyResult<T> {
    let progress = progress.map(|p| p.clone().unbind());
    match run_with(py, progress.as_ref(), f) {
        (Ok(_), Some(e)) => Err(e),
        (r, i) => r.map_err(|e| to_py(e, i)),
    }
}

/// [`pipeline`]'s work and the Ctrl-C seen while it ran, apart: work that finished although
/// it was cancelled (the Ctrl-C came after its last check) has still done what it does.
fn run<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&RunControl) -> fapm::Result<T> + Send,
) -> (fapm::Result<T>, Option<PyErr>) {
    run_with(py, None, f)
}

/// [`run`], calling `progress` as [`reporting`] says.
fn run_with<T: Send>(
    py: Python<'_>,
    progress: Option<&Py<PyAny>>,
    f: impl FnOnce(&RunControl) -> fapm::Result<T> + Send,
) -> (fapm::Result<T>, Option<PyErr>) {
    let ctl = RunControl::default();
    let report = |py: Python<'_>| -> PyResult<()> {
        if let Some(cb) = progress {
            let (done, total) = ctl.progress();
            cb.call1(py, (done, total, ctl.current()))?;
        }
        Ok(())
    };
    let mut interrupted = None;
    let result = py.detach(|| {
        std::thread::scope(|s| {
            let caller = std::thread::current();
            let ctl = &ctl;
            let worker = s.spawn(move || {
                let r = f(ctl);
                caller.unpark();
                r
            });
            while !worker.is_finished() {
                std::thread::park_timeout(Duration::from_millis(50));
                if interrupted.is_none() {
                    if let Err(e) = Python::attach(|py| py.check_signals().and_then(|()| report(py))) {
                        ctl.cancel();
                        interrupted = Some(e);
                    }
                }
            }
            worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    });
    if result.is_ok() && interrupted.is_none() {
        interrupted = report(py).err();
    }
    (result, interrupted)
}

/// A JSON value as the Python object `json.loads` makes of it.
fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    json_text_to_py(py, v.to_string())
}

/// JSON text as the Python object `json.loads` makes of it.
fn json_text_to_py(py: Python<'_>, text: String) -> PyResult<Bound<'_, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

/// A fresh buffer of `n` elements of `size` bytes, typed so that its memory is aligned for
/// the element (the Python half views it with the real dtype).
enum Buffer {
    B1(Vec<u8>),
    B2(Vec<u16>),
    B4(Vec<u32>),
    B8(Vec<u64>),
}

/// `n` zeroed elements, or None when the memory cannot be had (instead of aborting).
fn try_zeroed<T: Copy>(n: usize) -> Option<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout's size is not zero.
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` comes from the global allocator with the layout of `n` elements of T, all
    // zero bits, a valid value of the plain integers T is used with here.
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

impl Buffer {
    /// A zeroed buffer of `n` elements of `size` bytes for tensor `name` of `delta`; an error,
    /// not an abort, when the memory cannot be had.
    fn new(size: usize, n: u64, delta: &Path, name: &str) -> PyResult<Self> {
        let fail = || {
            let msg = format!("cannot allocate {} bytes for it", n.saturating_mul(size as u64));
            to_py(Error::tensor(delta, name, msg), None)
        };
        let n = usize::try_from(n).map_err(|_| fail())?;
        let b = match size {
            1 => try_zeroed(n).map(Buffer::B1),
            2 => try_zeroed(n).map(Buffer::B2),
            4 => try_zeroed(n).map(Buffer::B4),
            _ => try_zeroed(n).map(Buffer::B8),
        };
        b.ok_or_else(fail)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        fn bytes<T>(v: &mut [T]) -> &mut [u8] {
            // SAFETY: T is a plain unsigned integer here (no padding, every bit pattern valid),
            // and the byte slice covers exactly the vector's elements while borrowing it.
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        }
        match self {
            Buffer::B1(v) => v,
            Buffer::B2(v) => bytes(v),
            Buffer::B4(v) => bytes(v),
            Buffer::B8(v) => bytes(v),
        }
    }

    /// Hands the buffer to NumPy without a copy.
    fn into_py(self, py: Python<'_>) -> Bound<'_, PyAny> {
        match self {
            Buffer::B1(v) => v.into_pyarray(py).into_any(),
            Buffer::B2(v) => v.into_pyarray(py).into_any(),
            Buffer::B4(v) => v.into_pyarray(py).into_any(),
            Buffer::B8(v) => v.into_pyarray(py).into_any(),
        }
    }
}

/// `(dtype, shape, mode, base_dtype, kept)` of a tensor.
type TensorInfo = (String, Vec<u64>, String, Option<String>, u64);

/// Where a tensor's base bytes come from: a base checkpoint opened by fapm, or an array the
/// caller holds (its bytes, flat).
#[derive(FromPyObject)]
enum Base<'py> {
    Checkpoint(PyRef<'py, Checkpoint>),
    Bytes(PyReadonlyArray1<'py, u8>),
}

/// A base checkpoint (a .safetensors file or a directory of shards), memory-mapped.
#[pyclass(module = "fapm._fapm", frozen)]
struct Checkpoint {
    inner: RustCheckpoint,
}

#[pymethods]
impl Checkpoint {
    /// `charged`: the bytes of the budget's metadata half that the delta this checkpoint is
    /// the base of already takes ([`Delta::metadata_bytes`]), so that the two together stay
    /// within one budget, as in `fapm apply`.
    #[new]
    #[pyo3(signature = (path, *, memory_budget = None, charged = 0))]
    fn new(py: Python<'_>, path: PathBuf, memory_budget: Option<String>, charged: u64) -> PyResult<Self> {
        let run = options::Run { threads: None, memory_budget };
        let (_, budget) = run.check().map_err(|e| to_py(e, None))?;
        let hub = fapm::hub::Env::read(env);
        let path = pipeline(py, |_| fapm::hub::resolve_text(&path, None, fapm::hub::Want::Weights, &hub))?.path;
        let inner = pipeline(py, |ctl| {
            let _memory = RunMemory::new(budget);
            json::charge(charged).map_err(|e| Error::invalid(&path, e))?;
            RustCheckpoint::open_within(&path, budget, ctl)
        })?;
        Ok(Checkpoint { inner })
    }

    /// The checkpoint's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.root.clone()
    }
}

/// An opened delta: its verified manifest, blocks read when a tensor is asked for.
#[pyclass(module = "fapm._fapm", frozen)]
struct Delta {
    inner: Arc<RustDelta>,
    /// The checked memory budget, which also bounds what no base bounds ([`unbounded_limit`]).
    budget: u64,
    /// What its metadata took of the budget's metadata half (`RunMemory`).
    metadata: u64,
}

impl Delta {
    fn record(&self, name: &str) -> PyResult<&TensorRecord> {
        self.inner.tensor(name).map_err(|e| to_py(e, None))
    }
}

#[pymethods]
impl Delta {
    #[new]
    #[pyo3(signature = (path, *, revision = None, threads = None, memory_budget = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        revision: Option<String>,
        threads: Option<usize>,
        memory_budget: Option<String>,
    ) -> PyResult<Self> {
        let (threads, budget) = options::Run { threads, memory_budget }.check().map_err(|e| to_py(e, None))?;
        let named = options::Delta { name: path, revision };
        let path = pipeline(py, |_| named.resolve(&fapm::hub::Env::read(env)))?;
        let (inner, metadata) = pipeline(py, |ctl| {
            let memory = RunMemory::new(budget);
            let delta = RustDelta::open(&path, budget, threads, ctl)?;
            Ok((delta, memory.used()))
        })?;
        Ok(Delta { inner: Arc::new(inner), budget, metadata })
    }

    /// The bytes of the memory budget the delta's records take (of the half that metadata
    /// may use): what its base checkpoint is opened beside ([`Checkpoint::new`]'s `charged`).
    #[getter]
    fn metadata_bytes(&self) -> u64 {
        self.metadata
    }

    /// The base checkpoint the delta records (its repo id and commit), found in the Hugging
    /// Face cache or fetched: what `fapm apply` uses when no base is given.
    fn recorded_base(&self, py: Python<'_>) -> PyResult<PathBuf> {
        let hub = fapm::hub::Env::read(env);
        pipeline(py, |_| fapm::pipeline::apply::recorded_base(&self.inner.reader, &hub))
    }

    /// The delta's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.reader.path.clone()
    }

    /// The delta's tensor names, in the order of the output model.
    fn names(&self) -> Vec<String> {
        self.inner.reader.manifest.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// `(dtype, shape, mode, base_dtype, kept)` of tensor `name`; `base_dtype` is None for a
    /// tensor stored whole.
    fn tensor(&self, name: &str) -> PyResult<TensorInfo> {
        let t = self.record(name)?;
        Ok((t.dtype.to_string(), t.shape.clone(), t.mode.name().into(), t.base_dtype.map(|d| d.to_string()), t.kept))
    }

    /// The shape of the base tensor a record was made against: its own shape, or the smaller
    /// one an extended tensor (a resized vocabulary) grew from.
    fn base_shape(&self, name: &str) -> PyResult<Vec<u64>> {
        let t = self.record(name)?;
        Ok(t.extended.as_ref().map_or_else(|| t.shape.clone(), |e| e.base_shape.clone()))
    }

    /// What `fapm inspect --json` prints, as a dict.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let r = &self.inner.reader;
        json_text_to_py(py, fapm::json::inspect_text(&r.path, &r.manifest, r.size))
    }

    /// The `__metadata__` of the output shards' headers, merged (None when no shard has one).
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut merged = serde_json::Map::new();
        let mut any = false;
        for s in &self.inner.reader.manifest.shards {
            let header: serde_json::Value =
                serde_json::from_str(&s.header).map_err(|e| FapmError::new_err(one_line(&e.to_string())))?;
            if let Some(m) = header.get("__metadata__").and_then(|m| m.as_object()) {
                any = true;
                merged.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        if any {
            json_to_py(py, &serde_json::Value::Object(merged))
        } else {
            Ok(py.None().into_bound(py))
        }
    }

    /// Tensor `name` rebuilt and verified, as a flat array of unsigned integers of the
    /// element's width (the caller views it with the real dtype). `base` is needed for a
    /// pruned or dense tensor: a Checkpoint, or the base tensor's bytes; `base_label` names
    /// those bytes in errors.
    #[pyo3(signature = (name, base, base_label = "base"))]
    fn reconstruct<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        base: Option<Base<'py>>,
        base_label: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = self.record(name)?;
        let (base_ref, label) = match &base {
            Some(Base::Checkpoint(c)) => {
                let b = self.inner.base_of(&c.inner, t).map_err(|e| to_py(e, None))?;
                let label = b.as_ref().map_or_else(|| c.inner.root.clone(), |b| b.shard.path.clone());
                (b, label)
            }
            _ => (None, PathBuf::from(base_label)),
        };
        let bytes: Option<&[u8]> = match (&base, &base_ref) {
            (Some(Base::Bytes(a)), _) => Some(a.as_slice()?),
            (_, Some(b)) => Some(b.bytes()),
            _ => None,
        };
        // Checked before the output is allocated from the record's shape: the base bounds the
        // elements it was diffed against, the limit the rest.
        if let Some(dtype) = t.base_dtype {
            let b = bytes.ok_or_else(|| {
                to_py(Error::tensor(&self.inner.reader.path, name, "needs its base tensor to be rebuilt"), None)
            })?;
            let want = t.diffed_numel() * dtype.size() as u64;
            if b.len() as u64 != want {
                let msg = format!("tensor '{name}': base buffer has {} bytes, the tensor {want}", b.len());
                return Err(to_py(Error::Config(msg), None));
            }
        }
        let size = t.dtype.size() as u64;
        let unbounded = (t.numel() - t.diffed_numel()) * size;
        let limit = unbounded_limit(t, self.budget);
        if unbounded > limit {
            let msg = format!(
                "{unbounded} bytes that no base tensor bounds (stored whole or in added rows), more than the \
                 memory budget and {UNBOUNDED_RATIO} times their compressed size allow ({limit}); a larger \
                 memory_budget lets it load"
            );
            return Err(to_py(Error::tensor(&self.inner.reader.path, name, msg), None));
        }
        let mut out = Buffer::new(t.dtype.size(), t.numel(), &self.inner.reader.path, name)?;
        let delta = &self.inner;
        let out_bytes = out.bytes_mut();
        let watch = sigbus::watch(bytes.unwrap_or_default());
        let r = pipeline(py, |ctl| delta.reconstruct(name, bytes, &label, out_bytes, ctl));
        if watch.faulted() {
            return Err(truncated(&label));
        }
        r?;
        if let Some(b) = &base_ref {
            b.release();
        }
        Ok(out.into_py(py))
    }

    /// Patches tensor `name` in place: `target` (its bytes, flat and writable) holds the base
    /// tensor and ends up holding the fine-tuned one, verified; all or nothing. On success
    /// `name` is appended to `done` before returning, so that a Ctrl-C raised as the call
    /// returns cannot hide a finished patch from whoever must undo it.
    #[pyo3(signature = (name, target, check_base = true, base_label = "base", done = None))]
    fn patch(
        &self,
        py: Python<'_>,
        name: &str,
        mut target: PyReadwriteArray1<'_, u8>,
        check_base: bool,
        base_label: &str,
        done: Option<Bound<'_, PyList>>,
    ) -> PyResult<()> {
        let target = target.as_slice_mut()?;
        let delta = &self.inner;
        let label = PathBuf::from(base_label);
        let watch = sigbus::watch(target);
        let (r, mut interrupted) = run(py, |ctl| delta.patch(name, target, check_base, &label, ctl));
        if watch.faulted() {
            return Err(truncated(&label));
        }
        r.map_err(|e| to_py(e, interrupted.take()))?;
        // Patched, even if a Ctrl-C came after the last block: recorded before it is raised.
        if let Some(d) = done {
            d.append(name)?;
        }
        interrupted.map_or(Ok(()), Err)
    }

    /// Undoes `patch`: puts the base bits back at every position the delta keeps.
    fn revert(&self, py: Python<'_>, name: &str, mut target: PyReadwriteArray1<'_, u8>) -> PyResult<()> {
        let target = target.as_slice_mut()?;
        let delta = &self.inner;
        // Undoing is never interrupted: a Ctrl-C waits for it, then is raised.
        let watch = sigbus::watch(target);
        let r = py.detach(|| delta.revert(name, target));
        if watch.faulted() {
            return Err(truncated(Path::new("target")));
        }
        r.map_err(|e| to_py(e, None))
    }

    /// Checks that `base` (the bytes of a base tensor) is what the delta was made from.
    #[pyo3(signature = (name, base, base_label = "base"))]
    fn check_base(&self, py: Python<'_>, name: &str, base: PyReadonlyArray1<'_, u8>, base_label: &str) -> PyResult<()> {
        let base = base.as_slice()?;
        let delta = &self.inner;
        let label = PathBuf::from(base_label);
        let watch = sigbus::watch(base);
        let r = pipeline(py, |ctl| delta.check_base(name, base, &label, ctl));
        if watch.faulted() {
            return Err(truncated(&label));
        }
        r
    }

    /// `(indices, values)` of tensor `name`: flat int64 kept positions and the fine-tuned
    /// values there (unsigned integers of the element's width), rebuilt from `base`.
    #[pyo3(signature = (name, base, base_label = "base"))]
    fn patches<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        base: Base<'py>,
        base_label: &str,
    ) -> PyResult<(Bound<'py, PyArray1<i64>>, Bound<'py, PyAny>)> {
        let t = self.record(name)?;
        let (base_ref, label) = match &base {
            Base::Checkpoint(c) => {
                let b = self.inner.base_of(&c.inner, t).map_err(|e| to_py(e, None))?;
                let label = b.as_ref().map_or_else(|| c.inner.root.clone(), |b| b.shard.path.clone());
                (b, label)
            }
            Base::Bytes(_) => (None, PathBuf::from(base_label)),
        };
        let bytes: &[u8] = match (&base, &base_ref) {
            (Base::Bytes(a), _) => a.as_slice()?,
            (_, Some(b)) => b.bytes(),
            (_, None) => &[],
        };
        // Kept positions are at most the base tensor's elements (the reader checked), and the
        // base is checked against the record before anything is allocated from its counts.
        if let Some(dtype) = t.base_dtype {
            let want = t.diffed_numel() * dtype.size() as u64;
            if bytes.len() as u64 != want {
                let msg = format!("tensor '{name}': base buffer has {} bytes, the tensor {want}", bytes.len());
                return Err(to_py(Error::Config(msg), None));
            }
        }
        let path = &self.inner.reader.path;
        let Some(mut indices) = try_zeroed::<i64>(t.kept as usize) else {
            return Err(to_py(Error::tensor(path, name, format!("cannot allocate {} indices for it", t.kept)), None));
        };
        let mut values = Buffer::new(t.dtype.size(), t.kept, path, name)?;
        let (delta, idx, vals) = (&self.inner, &mut indices[..], values.bytes_mut());
        let watch = sigbus::watch(bytes);
        let r = pipeline(py, |ctl| delta.patches(name, bytes, &label, idx, vals, ctl));
        if watch.faulted() {
            return Err(truncated(&label));
        }
        r?;
        if let Some(b) = &base_ref {
            b.release();
        }
        Ok((indices.into_pyarray(py), values.into_py(py)))
    }
}

/// `fapm prune`: returns what `--json` prints (without `peak_memory_bytes`), as a dict.
/// `progress(done, total, current)` is told how far it is ([`reporting`]).
#[pyfunction]
#[pyo3(signature = (base, finetuned, output, *, sparsity = "0.9", metric = "fapm", threshold = "exact",
                    include = Vec::new(), exclude = Vec::new(), threads = None, memory_budget = None,
                    overwrite = false, penalty = "1", sparsity_for = Vec::new(), part = None,
                    progress = None))]
#[allow(clippy::too_many_arguments)]
fn prune<'py>(
    py: Python<'py>,
    base: PathBuf,
    finetuned: PathBuf,
    output: PathBuf,
    sparsity: &str,
    metric: &str,
    threshold: &str,
    include: Vec<String>,
    exclude: Vec<String>,
    threads: Option<usize>,
    memory_budget: Option<&str>,
    overwrite: bool,
    penalty: &str,
    sparsity_for: Vec<String>,
    part: Option<&str>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = options::Prune {
        sparsity: sparsity.into(),
        sparsity_for,
        metric: metric.into(),
        penalty: penalty.into(),
        threshold: threshold.into(),
        include,
        exclude,
        part: part.map(Into::into),
        overwrite,
        run: options::Run { threads, memory_budget: memory_budget.map(Into::into) },
        ..options::Prune::new(base, finetuned, output)
    };
    let cfg = py.detach(|| opts.check(env)).map_err(|e| to_py(e, None))?;
    let s = reporting(py, progress.as_ref(), |ctl| fapm::prune(&cfg, ctl))?;
    json_to_py(py, &fapm::json::prune(&s))
}

/// `fapm apply`: writes the model; returns what `--json` prints (without
/// `peak_memory_bytes`), as a dict. `progress` as for [`prune`].
#[pyfunction]
#[pyo3(signature = (base, delta, output, *, revision = None, threads = None, memory_budget = None, overwrite = false,
                    progress = None))]
#[allow(clippy::too_many_arguments)]
fn apply<'py>(
    py: Python<'py>,
    base: Option<PathBuf>,
    delta: PathBuf,
    output: PathBuf,
    revision: Option<String>,
    threads: Option<usize>,
    memory_budget: Option<&str>,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let run = options::Run { threads, memory_budget: memory_budget.map(Into::into) };
    let delta = options::Delta { name: delta, revision };
    let cfg =
        py.detach(|| ApplyConfig::new(base, &delta, Some(output), overwrite, &run, env)).map_err(|e| to_py(e, None))?;
    let s = reporting(py, progress.as_ref(), |ctl| fapm::apply(&cfg, ctl))?;
    json_to_py(py, &fapm::json::apply("applied", &s))
}

/// `fapm verify`: every hash in the delta; with `base`, also the base and the full
/// reconstruction (writing nothing). Returns what `--json` prints (without
/// `peak_memory_bytes`), as a dict. `progress` as for [`prune`].
#[pyfunction]
#[pyo3(signature = (delta, base = None, *, revision = None, delta_only = false, threads = None, memory_budget = None,
                    progress = None))]
#[allow(clippy::too_many_arguments)]
fn verify<'py>(
    py: Python<'py>,
    delta: PathBuf,
    base: Option<PathBuf>,
    revision: Option<String>,
    delta_only: bool,
    threads: Option<usize>,
    memory_budget: Option<&str>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let run = options::Run { threads, memory_budget: memory_budget.map(Into::into) };
    let delta = options::Delta { name: delta, revision };
    let cfg = py.detach(|| VerifyConfig::new(&delta, base, delta_only, &run, env)).map_err(|e| to_py(e, None))?;
    let s = reporting(py, progress.as_ref(), |ctl| fapm::verify(&cfg, ctl))?;
    json_to_py(py, &fapm::json::apply("verified", &s))
}

/// `fapm inspect --json`, as a dict.
#[pyfunction]
#[pyo3(signature = (delta, *, revision = None, memory_budget = None))]
fn inspect<'py>(
    py: Python<'py>,
    delta: PathBuf,
    revision: Option<String>,
    memory_budget: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let delta = options::Delta { name: delta, revision };
    let cfg = py.detach(|| InspectConfig::new(&delta, memory_budget, env)).map_err(|e| to_py(e, None))?;
    let (m, size) = pipeline(py, |ctl| fapm::inspect(&cfg, ctl))?;
    json_text_to_py(py, fapm::json::inspect_text(&cfg.delta, &m, size))
}

/// This process's environment, where the configuration reads the Hugging Face settings and
/// `--part auto`'s variables.
fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// `fapm card`: the delta and a README.md model card in a folder, ready for `hf upload`;
/// returns what `--json` prints, as a dict.
#[pyfunction]
#[pyo3(signature = (delta, output, *, revision = None, report = None, finetuned_card = None, repo_id = None,
                    memory_budget = None, overwrite = false))]
#[allow(clippy::too_many_arguments)]
fn card<'py>(
    py: Python<'py>,
    delta: PathBuf,
    output: PathBuf,
    revision: Option<String>,
    report: Option<PathBuf>,
    finetuned_card: Option<PathBuf>,
    repo_id: Option<String>,
    memory_budget: Option<&str>,
    overwrite: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let hub = fapm::hub::Env::read(env);
    let named = options::Delta { name: delta, revision };
    let cfg = py
        .detach(|| -> fapm::Result<_> {
            Ok(fapm::card::CardConfig {
                delta: named.resolve(&hub)?,
                output,
                report,
                finetuned_card,
                repo_id,
                memory_budget: fapm::config::memory_budget(memory_budget)?,
                hub: hub.clone(),
                overwrite,
            })
        })
        .map_err(|e| to_py(e, None))?;
    let s = pipeline(py, |ctl| fapm::card::card(&cfg, ctl))?;
    let mut v = serde_json::to_value(&s).expect("a summary serializes");
    v["command"] = serde_json::json!("card");
    json_to_py(py, &v)
}

/// `msg` as one printable line, as fapm's own errors are: for the messages the Python half
/// raises with names from a delta.
#[pyfunction]
fn _one_line(msg: &str) -> String {
    one_line(msg)
}

/// The Rust half of `fapm`.
#[pymodule]
fn _fapm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FapmError", m.py().get_type::<FapmError>())?;
    m.add_class::<Checkpoint>()?;
    m.add_class::<Delta>()?;
    m.add_function(wrap_pyfunction!(prune, m)?)?;
    m.add_function(wrap_pyfunction!(apply, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(card, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(_one_line, m)?)?;
    // Python installs no SIGBUS handler of its own (faulthandler's, when enabled, is kept and
    // called for faults outside fapm's buffers); `sigbus::watch` installs it again if code
    // run later replaced it.
    sigbus::install();
    // rust-numpy loads NumPy's C API and its borrow checker on first use, running Python
    // code: done here, not when a result is handed over, where a pending Ctrl-C would make
    // the loading fail (and rust-numpy panic).
    let probe = PyArray1::<u8>::zeros(m.py(), 0, false);
    drop(probe.readwrite());
    Ok(())
}
