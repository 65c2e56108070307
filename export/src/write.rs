//! Atomic writes: a temporary file in the destination's folder, synced, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use whittle_core::Model;

use crate::Error;

fn werr(path: &Path, e: std::io::Error) -> Error {
    let text = e.to_string();
    // some errors append "at path <temp file>"; the user asked for `path`, not the temp file
    let cause = text.split(" at path ").next().unwrap_or(&text).to_string();
    Error::Write {
        path: path.to_path_buf(),
        cause,
    }
}

/// Temporary files being written now; removed by the interrupt handler.
/// Temporary files being written now; removed by the interrupt handler. A file is created and
/// registered under this lock, and renamed into place under it, so the handler (which holds the
/// lock until the process exits) never misses one.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// On SIGINT / SIGTERM, remove the temporary files being written and exit with 130, so an
/// interrupted run leaves neither a partial output nor a stray temporary file. Call once, early.
pub fn remove_partial_files_on_interrupt() {
    let _ = ctrlc::set_handler(|| {
        let list = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        for p in list.iter() {
            let _ = std::fs::remove_file(p);
        }
        eprintln!("interrupted: nothing half-written was left behind");
        std::process::exit(130);
    });
}

fn lock() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Write `bytes` to `path` atomically: readers see the old file or the whole new one, and an
/// interrupted or failed write leaves no partial file (see [`remove_partial_files_on_interrupt`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let (file, tmp) = {
        let mut pending = lock();
        let mut attempt = 0;
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => {
                    pending.push(tmp.clone());
                    break (f, tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1
                }
                Err(e) => return Err(werr(path, e)),
            }
        }
    };
    let written = fill(file, bytes).map_err(|e| werr(path, e));
    let mut pending = lock();
    let result = written.and_then(|_| std::fs::rename(&tmp, path).map_err(|e| werr(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    pending.retain(|p| p != &tmp);
    result
}

fn fill(mut f: std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    f.write_all(bytes)?;
    #[cfg(unix)]
    {
        // a model is an ordinary file (0644, as the umask usually gives)
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    f.sync_all()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Save a model to `out`, refusing to overwrite `input`. Models whose tensors exceed protobuf's
/// 2 GiB limit (or when `external` is set) get their large tensors in a side file
/// `<out file name>.data` beside it, also written atomically. Returns the files written.
pub fn save_model(
    model: &Model,
    out: &Path,
    input: Option<&Path>,
    external: bool,
) -> Result<Vec<PathBuf>, Error> {
    if let Some(input) = input
        && (same_file(out, input) || out == input)
    {
        return Err(Error::SameAsInput(out.to_path_buf()));
    }
    let inline_size: usize = model
        .graph()
        .initializer
        .iter()
        .map(|t| t.raw_data.as_ref().map_or(0, |r| r.len()))
        .sum();
    if !external && inline_size < (1 << 31) - (64 << 20) {
        write_atomic(out, &model.to_bytes())?;
        return Ok(vec![out.to_path_buf()]);
    }
    let side_name = format!(
        "{}.data",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    );
    let (bytes, side) = model.to_bytes_external(&side_name, 1024)?;
    let side_path = out.with_file_name(&side_name);
    if let Some(input) = input
        && (same_file(&side_path, input) || side_path == input)
    {
        return Err(Error::SameAsInput(side_path));
    }
    if let Some(input) = input
        && (same_file(&side_path, input) || side_path == input)
    {
        return Err(Error::SameAsInput(side_path));
    }
    write_atomic(&side_path, &side)?;
    write_atomic(out, &bytes)?;
    Ok(vec![out.to_path_buf(), side_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.onnx");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn write_into_missing_folder_fails_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("no/such/dir/m.onnx");
        let e = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(e.contains("cannot write"), "{e}");
        assert!(!p.exists());
    }
}
