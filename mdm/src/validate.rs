//! Input rules shared by every endpoint: names, hosts, sizes.

use crate::error::MdmError;

/// Largest volume: 1 PiB.
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;
/// Volume sizes are whole 512-byte sectors (what NBD clients address).
pub const SECTOR: u64 = 512;
const MAX_NAME: usize = 64;

/// Names of volumes, nodes, pools and fault sets: `[A-Za-z0-9_.-]{1,64}`.
pub fn name(what: &str, value: &str) -> Result<(), MdmError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MdmError::invalid(
            "invalid_name",
            format!("{what} {value:?} is not a valid name: use 1 to 64 of A-Z a-z 0-9 _ . -"),
        ))
    }
}

/// Volume names also may not be all digits, which would read as an id in
/// the `/vol/{name-or-id}` paths.
pub fn volume_name(value: &str) -> Result<(), MdmError> {
    name("volume name", value)?;
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MdmError::invalid(
            "invalid_name",
            format!("volume name {value:?} is all digits, which reads as a volume id"),
        ));
    }
    Ok(())
}

/// A host name or address: 1 to 253 printable characters, no spaces.
pub fn host(value: &str) -> Result<(), MdmError> {
    let ok = !value.is_empty() && value.len() <= 253 && value.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(MdmError::invalid(
            "invalid_host",
            format!("host {value:?} is not a valid host name or address"),
        ))
    }
}

/// A volume size: more than zero, at most 1 PiB, whole 512-byte sectors.
pub fn volume_size(size_bytes: u64) -> Result<(), MdmError> {
    if size_bytes == 0 {
        return Err(MdmError::invalid("invalid_size", "size_bytes must be greater than zero"));
    }
    if size_bytes > MAX_VOLUME_BYTES {
        return Err(MdmError::invalid(
            "invalid_size",
            format!("size_bytes {size_bytes} exceeds the maximum volume size of 1 PiB ({MAX_VOLUME_BYTES})"),
        ));
    }
    if size_bytes & (SECTOR - 1) != 0 {
        return Err(MdmError::invalid(
            "invalid_size",
            format!("size_bytes {size_bytes} is not a multiple of {SECTOR}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("x", "vol-1_a.b").is_ok());
        assert!(name("x", "").is_err());
        assert!(name("x", &"a".repeat(65)).is_err());
        assert!(name("x", "a b").is_err());
        assert!(name("x", "a/b").is_err());
        assert!(name("x", "é").is_err());
        assert!(volume_name("123").is_err());
        assert!(volume_name("v123").is_ok());
    }

    #[test]
    fn sizes() {
        assert!(volume_size(0).is_err());
        assert!(volume_size(511).is_err());
        assert!(volume_size(512).is_ok());
        assert!(volume_size(MAX_VOLUME_BYTES).is_ok());
        assert!(volume_size(MAX_VOLUME_BYTES + 512).is_err());
    }
}
