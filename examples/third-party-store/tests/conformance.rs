//! The conformance suite run against `mykvstore`, reached by name as any user would.
use my_kvstore as _; // links the crate, whose registration provides `mykvstore`

kvstore_test::conformance_tests!(|| kvstore_base::create("mykvstore"));
