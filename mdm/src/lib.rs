//! mdm (to be written).
