/*
 * ckv: the clusterkv command-line tool. A table of subcommands; each one parses its own
 * options (see tools/cmd_*.c) and `ckv <command> --help` describes them.
 */
#include <stdio.h>
#include <string.h>

#include "ckv_cmds.h"

struct ckv_cmd {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
};

static const struct ckv_cmd cmds[] = {
    {"run", ckv_cmd_run, "generate text with a GGUF model in this process (ClusterKV by default)"},
    {"version", ckv_cmd_version, "print the version and the build's backends"},
    {"stats", ckv_cmd_stats, "print the stats of a running daemon (key:value or Prometheus)"},
    {"eval", ckv_cmd_eval,
     "quality of ClusterKV and baselines on the model: ppl, retrieval, agree, attn, sweep"},
    {"eval-attn", ckv_cmd_eval_attn,
     "attention recall / error / cache hits of ClusterKV and baselines (dumps or synthetic)"},
    {"generate", ckv_cmd_generate, "send one request to a running stack and stream the text"},
    {"top", ckv_cmd_top, "live table of the stack (router requests, workers) from its stats"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: ckv <command> [options]   (ckv <command> --help for its options)\n\n"
               "commands:\n");
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        fprintf(f, "  %-12s %s\n", cmds[i].name, cmds[i].help);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0)
        return ckv_cmd_version(argc - 1, argv + 1);
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        if (strcmp(argv[1], cmds[i].name) == 0)
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "ckv: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
