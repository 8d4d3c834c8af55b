/* A shared library that is not a kvstore plugin: it does not export kvstore_plugin_entry. */
int not_a_kvstore_plugin(int x) { return x + 1; }
