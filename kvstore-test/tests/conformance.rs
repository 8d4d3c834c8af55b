//! The conformance suite run against `teststore`, MXNet's TestStore.
kvstore_test::conformance_tests!(|| kvstore_base::create("teststore"));
