//! sdc-nbd (to be written).
