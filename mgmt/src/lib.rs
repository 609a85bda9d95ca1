//! mgmt (to be written).
