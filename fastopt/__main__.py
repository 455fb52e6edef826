"""python -m fastopt {demo,bench,config} [options]   (also installed as the `fastopt` command)"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fastopt.benchmark import main as bench
        return bench(argv[1:])
    if argv and argv[0] == "demo":
        from fastopt.demo import main as demo
        return demo(argv[1:])
    if argv == ["config"]:
        import fastopt
        fastopt.show_config()
        return 0
    print(__doc__.strip())
    print("  demo [--out DIR] [--steps N] [--mlp-steps N]   pictures of every rule at work\n"
          "  bench [--quick] [--rules NAME,NAME] [--threads N] [--json FILE] [--no-loop]\n"
          "  config   print the instruction set, threads and build flags")
    return 0 if argv in ([], ["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
