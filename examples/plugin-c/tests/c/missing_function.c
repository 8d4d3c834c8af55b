/* A version-1 descriptor without its required functions: the loader must refuse it. */
#include "kvstore_plugin.h"

static const KvPluginDescriptor DESCRIPTOR = {
    .abi_version = KV_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(KvPluginDescriptor),
    .name = "incomplete",
    .capabilities = 0,
};

const KvPluginDescriptor *kvstore_plugin_entry(void) { return &DESCRIPTOR; }
