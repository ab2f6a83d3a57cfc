//! Errors of the filesystem core and the read path, and the one place they become errnos.

use thiserror::Error;

use crate::client::ClientError;

#[derive(Debug, Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only file system")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error("file name too long")]
    NameTooLong,
    /// The bytes served of an object did not add up to its listed CRC32C: they were wrong,
    /// and nothing more will be served through that handle.
    #[error("checksum mismatch: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Client(#[from] ClientError),
}

impl FsError {
    /// The errno the kernel (and so the reading program) sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Corrupt(_) => libc::EIO,
            FsError::Client(c) => match c {
                // A listed object that is gone, or a version that changed: the handle is stale.
                ClientError::NotFound(_) | ClientError::Stale(_) => libc::ESTALE,
                ClientError::Denied { .. } | ClientError::Auth(_) => libc::EACCES,
                ClientError::Network { .. }
                | ClientError::Interrupted(_)
                | ClientError::Checksum(_) => libc::EIO,
                ClientError::Http { status, .. } if *status == 429 => libc::EIO,
                ClientError::Http { .. } | ClientError::Malformed(_) => libc::EIO,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
        assert_eq!(FsError::IsDir.errno(), libc::EISDIR);
        assert_eq!(FsError::NotDir.errno(), libc::ENOTDIR);
        assert_eq!(FsError::NameTooLong.errno(), libc::ENAMETOOLONG);
        let c = |e| FsError::Client(e).errno();
        assert_eq!(c(ClientError::NotFound("x".into())), libc::ESTALE);
        assert_eq!(c(ClientError::Stale("x".into())), libc::ESTALE);
        assert_eq!(
            c(ClientError::Denied {
                status: 403,
                message: "m".into()
            }),
            libc::EACCES
        );
        assert_eq!(c(ClientError::Auth("m".into())), libc::EACCES);
        assert_eq!(
            c(ClientError::Http {
                status: 503,
                message: "m".into()
            }),
            libc::EIO
        );
        assert_eq!(
            c(ClientError::Network {
                endpoint: "e".into(),
                cause: "c".into()
            }),
            libc::EIO
        );
        assert_eq!(c(ClientError::Malformed("m".into())), libc::EIO);
    }
}
