//! Crash-safe file output: write to a temporary file beside the target,
//! flush it to disk, then rename it over the target.
//!
//! A rename within one folder is atomic on POSIX file systems, so a reader
//! (or a later run) sees either the old file or the complete new one, never a
//! torn mix, even if the process is killed mid-write.
//!
//! The temporary file is `.<name>.tmp-<pid>` beside the target. A process
//! killed outright (SIGKILL, power loss) leaves it behind; the target itself
//! is untouched. [`remove_stale_temps`] clears such leftovers of processes
//! that no longer run; long-lived outputs (model files, score files) call it
//! before they write.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// A file being written; it replaces its target only on [`AtomicFile::commit`].
/// Dropped without a commit, it removes its temporary file.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<io::BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(target: &Path) -> io::Result<Self> {
        let temp = target.with_file_name(format!("{}{}", temp_prefix(target)?, std::process::id()));
        let file = File::create(&temp)?;
        Ok(Self {
            target: target.to_path_buf(),
            temp,
            file: Some(io::BufWriter::new(file)),
        })
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> io::Result<()> {
        let Some(writer) = self.file.take() else {
            return Ok(());
        };
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temp, &self.target)?;
        sync_parent(&self.target);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("file already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// `.<name>.tmp-`: the start of the temporary file names of `target`.
fn temp_prefix(target: &Path) -> io::Result<String> {
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(format!(".{}.tmp-", name.to_string_lossy()))
}

/// Removes temporary files of `target` left by processes that no longer run.
/// Best effort: errors are ignored. Only on Linux, where `/proc` tells which
/// processes run; a file of a live process (or of a reused pid) is kept.
pub fn remove_stale_temps(target: &Path) {
    let (Ok(prefix), Some(dir)) = (temp_prefix(target), target.parent()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !process_runs(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this id runs; `true` where that cannot be known.
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Makes the rename itself durable; failure only weakens durability, so it is ignored.
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        let dir = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("beltad-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_the_target_on_commit() {
        let dir = temp_dir("commit");
        let path = dir.join("model.bin");
        std::fs::write(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary file left behind"
        );
    }

    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let dir = temp_dir("stale");
        let path = dir.join("model.bin");
        // No process runs with a pid above the kernel's maximum (2^22).
        let dead = dir.join(".model.bin.tmp-4999999");
        let live = dir.join(format!(".model.bin.tmp-{}", std::process::id()));
        let other = dir.join(".other.bin.tmp-4999999");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        remove_stale_temps(&path);
        assert_eq!(dead.exists(), !cfg!(target_os = "linux"));
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn an_uncommitted_file_leaves_the_target_untouched() {
        let dir = temp_dir("abort");
        let path = dir.join("model.bin");
        std::fs::write(&path, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary file left behind"
        );
    }
}
