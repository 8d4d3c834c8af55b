//! The conformance suite run against the `device` store with CPU values (runs on any
//! machine: without a GPU, `device` serves CPU values as `local` does).
use kvstore_device as _; // links the crate, whose registration provides `device`

kvstore_test::conformance_tests!(|| kvstore_base::create("device"));
