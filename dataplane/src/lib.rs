//! pflex-dataplane (to be written).
