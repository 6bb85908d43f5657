//! The rules for naming a Hugging Face Hub repository: repo ids, revisions and commits, as
//! `huggingface_hub` validates them (its `validate_repo_id`). They are checked where a name is
//! given (the command line, Python) and where a delta records one (the manifest's provenance,
//! format version 3), so a name that reaches a cache path is always one of these.

/// The longest repo id part (namespace or name) the Hub accepts.
pub const MAX_NAME: usize = 96;
/// The longest revision (branch, tag or commit) a name may carry.
pub const MAX_REVISION: usize = 255;

/// Checks a repo id: `name` or `namespace/name`, each part 1 to 96 of `A-Za-z0-9_.-`, starting
/// and ending with a letter, digit or `_`, with no `--` or `..` anywhere and no `.git` ending.
/// Returns what is wrong.
pub fn check_id(id: &str) -> Result<(), &'static str> {
    let mut parts = id.split('/');
    let (first, second) = (parts.next().unwrap_or(""), parts.next());
    if parts.next().is_some() {
        return Err("has more than one '/'");
    }
    for part in std::iter::once(first).chain(second) {
        if part.is_empty() || part.len() > MAX_NAME {
            return Err("has a part that is empty or longer than 96 characters");
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Err("may only hold letters, digits, '_', '.', '-' and one '/'");
        }
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        if !word(part.as_bytes()[0]) || !word(part.as_bytes()[part.len() - 1]) {
            return Err("has a part that starts or ends with '.' or '-'");
        }
    }
    if id.contains("--") || id.contains("..") {
        return Err("contains '--' or '..'");
    }
    if id.ends_with(".git") {
        return Err("ends with '.git'");
    }
    Ok(())
}

/// Checks a revision: a branch, tag or commit name of printable ASCII, at most 255 bytes,
/// that is a safe relative path under a cache's `refs/` (no empty, `.` or `..` component, no
/// leading `/`), as git's own ref names are.
pub fn check_revision(rev: &str) -> Result<(), &'static str> {
    if rev.is_empty() || rev.len() > MAX_REVISION {
        return Err("is empty or longer than 255 bytes");
    }
    if !rev.bytes().all(|b| b.is_ascii_graphic() && !b"\\~^:?*[".contains(&b)) {
        return Err("may only hold printable ASCII without spaces or any of \\ ~ ^ : ? * [");
    }
    if rev.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("has an empty, '.' or '..' component");
    }
    Ok(())
}

/// Whether `s` is a commit id: 40 lowercase hexadecimal digits.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The cache folder name of a model repository, as `huggingface_hub` names it:
/// `models--namespace--name`.
pub fn cache_folder(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_the_hubs_rules() {
        for ok in [
            "gpt2",
            "meta-llama/Meta-Llama-3-8B",
            "a/b",
            "_x/y_",
            "org/name.v1",
            "sentence-transformers/all-MiniLM-L6-v2",
        ] {
            assert_eq!(check_id(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(97);
        for bad in [
            "", "/", "a/", "/b", "a/b/c", "a//b", "a--b/c", "a/b..c", "a/.b", "a/b-", "a/b.git", "a b/c", "a/b\n",
            &long, "../x", "a/é",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn revisions_are_safe_ref_paths() {
        for ok in ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567", "feature/x-y_z"] {
            assert_eq!(check_revision(ok), Ok(()), "{ok}");
        }
        for bad in ["", "..", "a/../b", "/main", "main/", "a//b", "a b", "a\u{7}", "x:y", &"r".repeat(256)] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_commit("main"));
        assert_eq!(cache_folder("org/name"), "models--org--name");
    }
}
