/* A plugin built for an ABI version this host does not speak: the loader must refuse it. */
#include "kvstore_plugin.h"

static const KvPluginDescriptor DESCRIPTOR = {
    .abi_version = 999u,
    .struct_size = sizeof(KvPluginDescriptor),
    .name = "from_the_future",
    .capabilities = 0,
};

const KvPluginDescriptor *kvstore_plugin_entry(void) { return &DESCRIPTOR; }
