//! The conformance suite run against the `local` store.
use kvstore_local as _; // links the crate, whose registration provides `local`

kvstore_test::conformance_tests!(|| kvstore_base::create("local"));
