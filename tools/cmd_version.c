/*
 * ckv version: the version and what this build contains.
 */
#include <stdio.h>
#include <zmq.h>

#include "ckv_cmds.h"
#include "ckv_wire.h"

int ckv_cmd_version(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    printf("clusterkv %s (protocol %u)\n", CKV_VERSION, CKV_PROTOCOL_VERSION);
    printf("cuda backend: %s\n", CKV_HAVE_CUDA_BUILD ? "built" : "not built");
    printf("zeromq %d.%d.%d, protobuf-c %s\n", major, minor, patch, protobuf_c_version());
    return 0;
}
