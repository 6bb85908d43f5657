//! Models and deltas named by Hugging Face Hub repo id (`org/name`, `org/name@REV`,
//! `hf://org/name`), found where `huggingface_hub` keeps them: its cache directory (the same
//! environment variables), `refs/` to a commit, the snapshot of that commit. What is missing
//! is fetched with the Hub's own Rust client (`hf-hub`) into the same cache, only the files
//! fapm needs, unless `HF_HUB_OFFLINE` is set. docs/HUB.md is the user's account.
//!
//! An existing local path always wins over a repo id; `hf://` forces one.

use std::path::{Path, PathBuf};

use fapm_stages::checkpoint::index::missing_shards;
use fapm_stages::error::printable;
use fapm_stages::format::RepoRecord;
#[cfg(any(feature = "fetch", test))]
use fapm_stages::paths;
use fapm_stages::repo::{cache_folder, check_id, check_revision, is_commit};
use fapm_stages::Error;

/// The prefix that makes a name a repo id even where a local path of that name exists.
pub const SCHEME: &str = "hf://";
/// The revision when none is named.
pub const DEFAULT_REVISION: &str = "main";
/// The index file of a sharded checkpoint.
#[cfg(any(feature = "fetch", test))]
const INDEX_FILE: &str = fapm_stages::checkpoint::INDEX_FILE;

/// How fapm reaches the Hub, read from the environment as `huggingface_hub` reads it.
#[derive(Debug, Clone)]
pub struct Env {
    /// The cache directory (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set to a true value.
    pub offline: bool,
    /// `HF_ENDPOINT`, else the Hub.
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `HF_HOME/token`).
    pub token: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl Env {
    /// The settings `get` gives: `|k| std::env::var(k).ok()` for the process's own.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Env {
        let set = |k: &str| get(k).filter(|v| !v.is_empty());
        let home_dir = || set("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        let expand = |v: String| match v.strip_prefix("~/") {
            Some(rest) => home_dir().join(rest),
            None if v == "~" => home_dir(),
            None => PathBuf::from(v),
        };
        let hf_home = set("HF_HOME").map(expand).unwrap_or_else(|| {
            set("XDG_CACHE_HOME").map(expand).unwrap_or_else(|| home_dir().join(".cache")).join("huggingface")
        });
        let cache = set("HF_HUB_CACHE")
            .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let truthy = |k: &str| set(k).is_some_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_uppercase().as_str()));
        let token_file = set("HF_TOKEN_PATH").map(expand).unwrap_or_else(|| hf_home.join("token"));
        let token = set("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        Env {
            cache,
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
            endpoint: set("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            token,
            progress: !truthy("HF_HUB_DISABLE_PROGRESS_BARS"),
        }
    }

    /// The settings of this process's environment.
    pub fn from_process() -> Env {
        Env::read(|k| std::env::var(k).ok())
    }
}

/// A model or delta as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// A file or directory on this machine.
    Local(PathBuf),
    /// A repository on the Hub.
    Repo {
        /// `org/name`.
        id: String,
        /// The revision named, if any.
        revision: Option<String>,
    },
}

impl Name {
    /// Reads a name: `hf://ID[@REV]` is a repo id; else an existing path is that path; else
    /// `ORG/NAME[@REV]` that is a valid repo id is one; else a path (which the command then
    /// reports missing). `revision` (`--revision`) is a repo id's revision.
    pub fn parse(text: &Path, revision: Option<&str>) -> Result<Name, Error> {
        let s = text.to_str();
        let forced = s.and_then(|s| s.strip_prefix(SCHEME));
        let repo = match forced {
            Some(rest) => Some(rest),
            None if std::fs::symlink_metadata(text).is_ok() => None,
            None => s.filter(|s| s.contains('/') && check_id(s.split('@').next().unwrap_or("")).is_ok()),
        };
        let Some(spec) = repo else {
            if let Some(rev) = revision {
                return Err(Error::Config(format!(
                    "--revision {} names a revision of a repo id, but '{}' is a local path",
                    printable(rev),
                    printable(&text.display().to_string())
                )));
            }
            return Ok(Name::Local(text.to_path_buf()));
        };
        let (id, at) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        let bad = |why: String| Error::Config(format!("invalid repo id '{}': {why}", printable(spec)));
        check_id(id).map_err(|why| bad(format!("it {why}")))?;
        let revision = match (at, revision) {
            (Some(a), Some(b)) if a != b => return Err(bad(format!("it names revision '{a}' and --revision '{b}'"))),
            (a, b) => a.or(b),
        };
        if let Some(rev) = revision {
            check_revision(rev).map_err(|why| bad(format!("its revision {why}")))?;
        }
        Ok(Name::Repo { id: id.to_owned(), revision: revision.map(str::to_owned) })
    }
}

/// What fapm needs of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A base checkpoint: its shards and their index.
    Weights,
    /// A fine-tuned checkpoint: its shards, their index and every side file (all but the
    /// weight and pickle formats that are never side files).
    Model,
    /// A delta: the one `*.fapm` file of a delta repository or folder (`fapm card`).
    Delta,
}

/// A name resolved to a path on this machine.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The file or directory to read.
    pub path: PathBuf,
    /// The repository and commit, when named by repo id.
    pub repo: Option<RepoRecord>,
}

/// Resolves `name` to what fapm reads: a local path as it is (a delta folder to its one
/// `*.fapm` file), a repo id to the cache's snapshot of its revision, fetching what is
/// missing unless offline.
pub fn resolve(name: &Name, want: Want, env: &Env) -> Result<Resolved, Error> {
    match name {
        Name::Local(path) => {
            let path = if want == Want::Delta && path.is_dir() { delta_in(path)? } else { path.clone() };
            Ok(Resolved { path, repo: None })
        }
        Name::Repo { id, revision } => {
            let revision = revision.as_deref().unwrap_or(DEFAULT_REVISION);
            let repo = CachedRepo { dir: env.cache.join(cache_folder(id)), id, revision };
            let (snapshot, commit) = match repo.snapshot(want)? {
                Some(found) => found,
                None if env.offline => return Err(repo.missing(want, env, "HF_HUB_OFFLINE is set")),
                None => fetch(&repo, want, env)?,
            };
            let path = if want == Want::Delta { delta_in(&snapshot)? } else { snapshot };
            let record = RepoRecord { repo: id.clone(), revision: revision.to_owned(), commit };
            Ok(Resolved { path, repo: Some(record) })
        }
    }
}

/// Resolves a name given as text (the command line's, Python's), with `--revision`.
pub fn resolve_text(text: &Path, revision: Option<&str>, want: Want, env: &Env) -> Result<Resolved, Error> {
    resolve(&Name::parse(text, revision)?, want, env)
}

/// A repository's place in the cache.
struct CachedRepo<'a> {
    dir: PathBuf,
    id: &'a str,
    revision: &'a str,
}

impl CachedRepo<'_> {
    /// The commit the revision names in the cache: itself if it is one, else what
    /// `refs/REVISION` holds.
    fn commit(&self) -> Option<String> {
        if is_commit(self.revision) {
            return Some(self.revision.to_owned());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(self.revision)).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_owned())
    }

    /// The snapshot directory of the revision and its commit, when it holds what `want` needs.
    fn snapshot(&self, want: Want) -> Result<Option<(PathBuf, String)>, Error> {
        let Some(commit) = self.commit() else { return Ok(None) };
        let dir = self.dir.join("snapshots").join(&commit);
        if !dir.is_dir() {
            return Ok(None);
        }
        let complete = match want {
            Want::Delta => deltas_in(&dir)?.len() == 1,
            Want::Weights | Want::Model => missing_shards(&dir, fapm_stages::DEFAULT_MEMORY_BUDGET)?.is_empty(),
        };
        Ok(complete.then_some((dir, commit)))
    }

    /// The error for a repository the cache lacks, with the command that fetches it.
    fn missing(&self, want: Want, env: &Env, why: &str) -> Error {
        let files = match want {
            Want::Weights => " --include '*.safetensors' --include 'model.safetensors.index.json'",
            Want::Model => " --exclude '*.bin' --exclude '*.pt' --exclude '*.pth' --exclude '*.h5' --exclude '*.msgpack' --exclude '*.onnx' --exclude '*.gguf'",
            Want::Delta => "",
        };
        Error::Config(format!(
            "{}@{} is not in the Hugging Face cache ({}) and {why}; fetch it with: hf download {} --revision {}{files}",
            self.id,
            printable(self.revision),
            printable(&env.cache.display().to_string()),
            self.id,
            printable(self.revision),
        ))
    }
}

/// The `*.fapm` files at the top of `dir`, sorted.
fn deltas_in(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "fapm") && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// The one delta of a delta folder (what `fapm card` writes).
fn delta_in(dir: &Path) -> Result<PathBuf, Error> {
    let mut found = deltas_in(dir)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::invalid(dir, "this folder holds no .fapm delta")),
        n => Err(Error::invalid(dir, format!("this folder holds {n} .fapm deltas; name one of them"))),
    }
}

/// Whether a file of a repository is one fapm needs for `want`.
#[cfg(any(feature = "fetch", test))]
fn needed(want: Want, file: &str) -> bool {
    if !paths::is_safe_relative(file) || paths::check(file).is_err() {
        return false;
    }
    let top = !file.contains('/');
    match want {
        Want::Delta => top && (file.ends_with(".fapm") || file == "README.md"),
        Want::Weights => top && (file.ends_with(".safetensors") || file == INDEX_FILE),
        Want::Model => file.ends_with(".safetensors") || paths::weight_format(file).is_none(),
    }
}

/// Without the `fetch` feature (the fuzz targets' build): nothing is fetched, and a repo not
/// in the cache is missing, with the `hf download` command that fetches it.
#[cfg(not(feature = "fetch"))]
fn fetch(repo: &CachedRepo, want: Want, env: &Env) -> Result<(PathBuf, String), Error> {
    Err(repo.missing(want, env, "this fapm was built without fetching (the `fetch` feature)"))
}

/// Fetches what `want` needs of a repository into the cache with the Hub's client; returns
/// the snapshot and its commit.
#[cfg(feature = "fetch")]
fn fetch(repo: &CachedRepo, want: Want, env: &Env) -> Result<(PathBuf, String), Error> {
    use fapm_stages::error::one_line;
    use hf_hub::api::sync::ApiBuilder;
    let failed = |why: String| repo.missing(want, env, &format!("fetching it from {} failed: {why}", env.endpoint));
    let api = ApiBuilder::from_cache(hf_hub::Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(env.progress)
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let hub = hf_hub::Repo::with_revision(repo.id.to_owned(), hf_hub::RepoType::Model, repo.revision.to_owned());
    let api = api.repo(hub);
    let info = api.info().map_err(|e| failed(one_line(&e.to_string())))?;
    if !is_commit(&info.sha) {
        return Err(failed(format!("the Hub answered commit '{}'", printable(&info.sha))));
    }
    let snapshot = repo.dir.join("snapshots").join(&info.sha);
    for file in info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| needed(want, f)) {
        if !snapshot.join(file).is_file() {
            api.download(file).map_err(|e| failed(format!("{file}: {}", one_line(&e.to_string()))))?;
        }
    }
    match repo.snapshot(want)? {
        Some(found) if found.1 == info.sha => Ok(found),
        _ => Err(failed(format!("the repo at commit {} lacks the files fapm needs", info.sha))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::read(move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_cache_is_where_huggingface_hub_puts_it() {
        assert_eq!(env(&[("HOME", "/h")]).cache, Path::new("/h/.cache/huggingface/hub"));
        assert_eq!(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]).cache, Path::new("/x/huggingface/hub"));
        assert_eq!(env(&[("HF_HOME", "~/hf"), ("HOME", "/h")]).cache, Path::new("/h/hf/hub"));
        let both = env(&[("HF_HOME", "/a"), ("HF_HUB_CACHE", "/b")]);
        assert_eq!(both.cache, Path::new("/b"));
        assert_eq!(env(&[("HUGGINGFACE_HUB_CACHE", "/c")]).cache, Path::new("/c"));
        assert!(env(&[("HF_HUB_OFFLINE", "yes")]).offline);
        assert!(env(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert!(!env(&[("HF_HUB_OFFLINE", "0")]).offline);
        assert_eq!(env(&[("HF_TOKEN", " t \n")]).token.as_deref(), Some("t"));
        assert_eq!(env(&[("HF_ENDPOINT", "http://h")]).endpoint, "http://h");
    }

    #[test]
    fn names_are_paths_first_then_repo_ids() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("org");
        std::fs::create_dir_all(local.join("name")).unwrap();
        let repo = |id: &str, rev: Option<&str>| Name::Repo { id: id.into(), revision: rev.map(Into::into) };
        assert_eq!(Name::parse(Path::new("org/name@v1"), None).unwrap(), repo("org/name", Some("v1")));
        assert_eq!(Name::parse(Path::new("org/name"), Some("v2")).unwrap(), repo("org/name", Some("v2")));
        assert_eq!(Name::parse(Path::new("hf://gpt2"), None).unwrap(), repo("gpt2", None));
        let shadow = local.join("name");
        assert_eq!(Name::parse(&shadow, None).unwrap(), Name::Local(shadow.clone()));
        // (A relative name that exists locally: tests/it/hub.rs, from a working directory.)
        assert_eq!(Name::parse(Path::new("hf://org/name"), None).unwrap(), repo("org/name", None));
        assert_eq!(Name::parse(Path::new("no-such-file"), None).unwrap(), Name::Local("no-such-file".into()));
        assert_eq!(Name::parse(Path::new("a/b/c"), None).unwrap(), Name::Local("a/b/c".into()));
        for bad in ["hf://a/b/c", "hf://a/b@", "hf://a/..", "hf://a/b@x/../y"] {
            assert!(Name::parse(Path::new(bad), None).is_err(), "{bad}");
        }
        assert!(Name::parse(Path::new("org/name@v1"), Some("v2")).is_err());
        assert!(Name::parse(&shadow, Some("v1")).is_err());
    }

    #[test]
    fn only_the_files_fapm_needs_are_fetched() {
        assert!(needed(Want::Weights, "model-00001-of-00002.safetensors"));
        assert!(needed(Want::Weights, INDEX_FILE));
        assert!(!needed(Want::Weights, "config.json"));
        assert!(needed(Want::Model, "config.json"));
        assert!(needed(Want::Model, "1_Pooling/config.json"));
        assert!(!needed(Want::Model, "pytorch_model.bin"));
        assert!(!needed(Want::Model, ".gitattributes"));
        assert!(!needed(Want::Model, "../escape.json"));
        assert!(needed(Want::Delta, "model.fapm"));
        assert!(!needed(Want::Delta, "sub/model.fapm"));
    }
}
