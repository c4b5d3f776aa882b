//! Just enough ELF to tell how a binary is loaded: its program interpreter (`PT_INTERP`,
//! the dynamic loader the kernel starts it with), absent for static executables.
//! Layout from the System V ABI, "Program Header" (ELF-64 object file format, little endian).

/// Why a file could not be read as an ELF executable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("only 64-bit little-endian ELF is supported (class {class}, data {data})")]
    Unsupported { class: u8, data: u8 },
    #[error("truncated ELF: {what} lies outside the file")]
    Truncated { what: &'static str },
}

const PT_INTERP: u32 = 3;

fn u16_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u16, ElfError> {
    bytes
        .get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(ElfError::Truncated { what })
}

fn u32_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u32, ElfError> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(ElfError::Truncated { what })
}

fn u64_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u64, ElfError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(ElfError::Truncated { what })
}

fn offset(value: u64, what: &'static str) -> Result<usize, ElfError> {
    usize::try_from(value).map_err(|_| ElfError::Truncated { what })
}

/// The program interpreter of an executable (`/lib64/ld-linux-x86-64.so.2`), or `None` for a
/// static executable (including static-pie, which has no interpreter either).
pub fn interpreter(bytes: &[u8]) -> Result<Option<String>, ElfError> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    let (class, data) = (bytes.get(4).copied(), bytes.get(5).copied());
    if class != Some(2) || data != Some(1) {
        return Err(ElfError::Unsupported {
            class: class.unwrap_or(0),
            data: data.unwrap_or(0),
        });
    }
    let phoff = offset(u64_at(bytes, 0x20, "e_phoff")?, "e_phoff")?;
    let phentsize = usize::from(u16_at(bytes, 0x36, "e_phentsize")?);
    let phnum = usize::from(u16_at(bytes, 0x38, "e_phnum")?);
    for index in 0..phnum {
        let header = phoff + index * phentsize;
        if u32_at(bytes, header, "program header")? != PT_INTERP {
            continue;
        }
        let start = offset(u64_at(bytes, header + 8, "p_offset")?, "PT_INTERP")?;
        let size = offset(u64_at(bytes, header + 32, "p_filesz")?, "PT_INTERP")?;
        let raw = bytes
            .get(start..start.saturating_add(size))
            .ok_or(ElfError::Truncated { what: "PT_INTERP" })?;
        let text = raw.split(|&b| b == 0).next().unwrap_or_default();
        return Ok(Some(String::from_utf8_lossy(text).into_owned()));
    }
    Ok(None)
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
        assert_eq!(interpreter(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        let mut bytes = elf(&[(3, 0x100, 4096)], b"/x\0");
        assert_eq!(
            interpreter(&bytes),
            Err(ElfError::Truncated { what: "PT_INTERP" })
        );
        bytes[4] = 1;
        assert!(matches!(
            interpreter(&bytes),
            Err(ElfError::Unsupported { class: 1, .. })
        ));
        let header_only = &elf(&[(3, 0x100, 1)], b"x")[..0x30];
        assert!(matches!(
            interpreter(header_only),
            Err(ElfError::Truncated { .. })
        ));
    }
}
