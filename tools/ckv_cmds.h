/*
 * The subcommands of the ckv CLI. Each lives in tools/cmd_<name>.c and takes the arguments
 * after its name (argv[0] is the subcommand name). Returns the process exit status.
 */
#ifndef CKV_CMDS_H
#define CKV_CMDS_H

int ckv_cmd_version(int argc, char **argv);
int ckv_cmd_stats(int argc, char **argv);
int ckv_cmd_eval_attn(int argc, char **argv);
int ckv_cmd_run(int argc, char **argv);
int ckv_cmd_eval(int argc, char **argv);
int ckv_cmd_generate(int argc, char **argv);
int ckv_cmd_top(int argc, char **argv);

#endif
