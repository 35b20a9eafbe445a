//! Where a profile's files come from: the filesystem, or the binary itself (built-in `tiny`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/tiny_files.rs"));

/// A read-only file source.
#[derive(Debug, Clone, Copy)]
pub enum Files {
    Disk,
    /// Files embedded at build time, addressed by their path relative to the profile.
    Embedded(&'static [(&'static str, &'static [u8])]),
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl Files {
    /// The built-in `tiny` profile's files.
    pub fn tiny() -> Self {
        Files::Embedded(TINY_FILES)
    }

    pub fn read(&self, path: &Path) -> Result<Cow<'static, [u8]>, FileError> {
        match self {
            Files::Disk => std::fs::read(path).map(Cow::Owned).map_err(|source| FileError { path: path.into(), source }),
            Files::Embedded(files) => {
                let wanted = path.to_string_lossy().replace('\\', "/");
                files.iter().find(|(name, _)| *name == wanted).map(|(_, bytes)| Cow::Borrowed(*bytes)).ok_or_else(|| FileError {
                    path: path.into(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not embedded in this build"),
                })
            }
        }
    }

    pub fn read_to_string(&self, path: &Path) -> Result<String, FileError> {
        let bytes = self.read(path)?;
        String::from_utf8(bytes.into_owned())
            .map_err(|e| FileError { path: path.into(), source: std::io::Error::new(std::io::ErrorKind::InvalidData, e) })
    }
}
