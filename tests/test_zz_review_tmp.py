from tests.bypass import BypassProxy

NAMES = [b'"/Archive"', b'"Archive/"', b'"./Archive"', b'"Archive/."', b'"ARCHIVE"', b'"~/Archive"', b'"INBOX/../Archive"',
         b'"&AEE-rchive"', b'"Lists//dev"', b'"Lists/dev/"', b'"lists/dev"', b'"Archive*"', b'"Arch%"', b'"Archive\x00"']

def test_probe_names(bypassProxy: BypassProxy) -> None:
    with bypassProxy.directSession("victor") as d, bypassProxy.session("mallory") as m, bypassProxy.session("rory") as r:
        for i, n in enumerate(NAMES):
            if b"\x00" in n: continue
            out = []
            for label, s in (("direct", d), ("mallory", m), ("rory", r)):
                try:
                    rep = s.command(b"t%d STATUS %s (MESSAGES)" % (i, n), timeout=10)
                except Exception as e:
                    rep = [repr(e).encode()]
                out.append((label, rep))
            print("NAME", n, out)
        for cmd in [b'x1 LIST "Lists" "dev"', b'x2 LIST "Lists" "*"', b'x3 LIST "" "Lists/%" RETURN (STATUS (MESSAGES))',
                    b'x4 LIST (SUBSCRIBED RECURSIVEMATCH) "" "*" RETURN (CHILDREN STATUS (MESSAGES))',
                    b'x5 LIST (SPECIAL-USE) "" "*"', b'x6 LIST "" "*" RETURN (SPECIAL-USE MYRIGHTS)', b'x7 LIST "/" "*"', b'x8 LIST "Lists/dev/" ""', b'x9 LIST "Lists/dev" ""',
                    b'y1 ESEARCH IN (personal) ALL', b'y2 GETMETADATA (DEPTH infinity) "" (/private)', b'y3 LIST "" "*" RETURN (METADATA (/private/comment))']:
            for label, s in (("direct", d), ("rory", r), ("mallory", m)):
                try:
                    rep = s.command(cmd, timeout=10)
                except Exception as e:
                    rep = [repr(e).encode()]
                print("CMD", label, cmd, rep)
