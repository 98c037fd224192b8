//! Helpers shared by the property suites of this crate (not a test target itself).

#![allow(dead_code)]

pub mod taskfile;
