//! How an executable is loaded: its program interpreter (`PT_INTERP`, the dynamic loader the
//! kernel starts it with), absent for static executables. Read with the `object` crate, for
//! 32- and 64-bit ELF of either byte order. Used by the image build (which binaries need
//! which libraries) and by the local cluster's pod image (a static busybox).

use object::{
    FileKind,
    elf::{FileHeader32, FileHeader64},
    read::elf::{FileHeader, ProgramHeader},
};

/// Why a file could not be read as an ELF executable.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("malformed ELF: {0}")]
    Malformed(#[from] object::read::Error),
}

/// The program interpreter of an executable (`/lib64/ld-linux-x86-64.so.2`), or `None` for a
/// static executable (including static-pie, which has no interpreter either).
pub fn interpreter(bytes: &[u8]) -> Result<Option<String>, ElfError> {
    match FileKind::parse(bytes) {
        Ok(FileKind::Elf32) => interpreter_of::<FileHeader32<object::Endianness>>(bytes),
        Ok(FileKind::Elf64) => interpreter_of::<FileHeader64<object::Endianness>>(bytes),
        _ => Err(ElfError::NotElf),
    }
}

fn interpreter_of<Elf: FileHeader<Endian = object::Endianness>>(
    bytes: &[u8],
) -> Result<Option<String>, ElfError> {
    let header = Elf::parse(bytes)?;
    let endian = header.endian()?;
    for segment in header.program_headers(endian, bytes)? {
        if let Some(path) = segment.interpreter(endian, bytes)? {
            return Ok(Some(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Ok(None)
}

/// Whether `bytes` is an ELF executable without a program interpreter (statically linked).
pub fn is_static(bytes: &[u8]) -> bool {
    matches!(interpreter(bytes), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF-64 header with `phdrs` program headers of (type, offset, size), followed
    /// by `payload` at offset 0x100.
    fn elf(phdrs: &[(u32, u64, u64)], payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; 0x100];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[6] = 1; // EV_CURRENT
        bytes[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (index, (kind, off, size)) in phdrs.iter().enumerate() {
            let at = 0x40 + index * 56;
            bytes[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            bytes[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            bytes[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        }
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn dynamic_executables_name_their_loader() {
        let loader = b"/lib64/ld-linux-x86-64.so.2\0";
        let bytes = elf(&[(6, 0, 0), (3, 0x100, loader.len() as u64)], loader);
        assert_eq!(
            interpreter(&bytes).unwrap().as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn static_executables_have_no_loader() {
        assert_eq!(
            interpreter(&elf(&[(1, 0, 0), (2, 0, 0)], &[])).unwrap(),
            None
        );
    }

    #[test]
    fn this_test_binary_is_read_like_the_image_binaries() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are linked like the agent: dynamically, against the host's libc.
        let loader = interpreter(&bytes).unwrap().expect("a dynamic test binary");
        assert!(loader.starts_with('/'), "{loader}");
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(matches!(interpreter(b"#!/bin/sh\n"), Err(ElfError::NotElf)));
        let mut bytes = elf(&[(3, 0x100, 4096)], b"/x\0");
        assert!(matches!(interpreter(&bytes), Err(ElfError::Malformed(_))));
        bytes[4] = 9;
        assert!(matches!(interpreter(&bytes), Err(ElfError::NotElf)));
        let header_only = &elf(&[(3, 0x100, 1)], b"x")[..0x30];
        assert!(interpreter(header_only).is_err());
        assert!(
            !is_static(header_only),
            "a broken file is not a static executable"
        );
        assert!(is_static(&elf(&[(1, 0, 0)], &[])));
    }
}
