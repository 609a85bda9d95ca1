//! sds-uring (to be written).
