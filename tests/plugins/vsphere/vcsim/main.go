// A vSphere API simulator for blockferry's tests: govmomi's simulator (the library behind vcsim,
// from Debian's golang-github-vmware-govmomi-dev) with a vCenter model, served on loopback.
//
// The simulator (0.24) does not implement QueryChangedDiskAreas, so this harness adds changed
// block tracking in front of it: the tests record the areas they write (POST /cbt/write), which
// sets the disk's changeId as vSphere would, and QueryChangedDiskAreas is answered from those
// records; POST /cbt/reset loses the tracking state (as a VM restored or moved does), so an old
// changeId is refused; POST /cbt/clear forgets every area of the disk (tests start afresh). Every
// other request goes to the simulator unchanged.
//
// Built by the `vcsim` fixture of tests/plugins/vsphere/conftest.py (GO111MODULE=off, GOPATH
// pointing at Debian's Go source tree). It prints the SDK URL on one line of standard output and
// serves until its standard input is closed (or it is terminated).
package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type area struct {
	seq           int
	start, length int64
}

// tracking is the harness's changed block tracking: written areas per "vm/deviceKey".
type tracking struct {
	mu    sync.Mutex
	seq   int
	epoch map[string]int
	areas map[string][]area
}

func (t *tracking) changeID(key string) string {
	return fmt.Sprintf("52 %d/%d", t.epoch[key], t.seq)
}

// setChangeID writes the disk's current changeId into the VM's configuration.
func setChangeID(vmRef string, deviceKey int32, id string) bool {
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	found := false
	simulator.Map.WithLock(vm, func() {
		for _, d := range vm.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == deviceKey {
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					b.ChangeId = id
					found = true
				}
			}
		}
	})
	return found
}

func capacity(vmRef string, deviceKey int32) int64 {
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return 0
	}
	var n int64
	simulator.Map.WithLock(vm, func() {
		for _, d := range vm.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == deviceKey {
				n = disk.CapacityInBytes
				if n == 0 {
					n = disk.CapacityInKB * 1024
				}
			}
		}
	})
	return n
}

// record serves POST /cbt/write?vm=vm-42&key=2000&start=S&length=N, /cbt/reset?vm=&key= and
// /cbt/clear?vm=&key=.
func (t *tracking) record(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	vmRef := q.Get("vm")
	dk, err := strconv.Atoi(q.Get("key"))
	if err != nil || vmRef == "" {
		http.Error(w, "vm and key needed", http.StatusBadRequest)
		return
	}
	key := fmt.Sprintf("%s/%d", vmRef, dk)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.seq++
	if strings.HasSuffix(r.URL.Path, "/reset") {
		t.epoch[key]++
	} else if strings.HasSuffix(r.URL.Path, "/clear") { // a new, empty disk (between tests)
		t.epoch[key]++
		delete(t.areas, key)
	} else {
		start, err1 := strconv.ParseInt(q.Get("start"), 10, 64)
		length, err2 := strconv.ParseInt(q.Get("length"), 10, 64)
		if err1 != nil || err2 != nil {
			http.Error(w, "start and length needed", http.StatusBadRequest)
			return
		}
		t.areas[key] = append(t.areas[key], area{t.seq, start, length})
	}
	id := t.changeID(key)
	if !setChangeID(vmRef, int32(dk), id) {
		http.Error(w, "no such VM disk", http.StatusNotFound)
		return
	}
	fmt.Fprintln(w, id)
}

type query struct {
	This        string `xml:"Body>QueryChangedDiskAreas>_this"`
	DeviceKey   int32  `xml:"Body>QueryChangedDiskAreas>deviceKey"`
	StartOffset int64  `xml:"Body>QueryChangedDiskAreas>startOffset"`
	ChangeID    string `xml:"Body>QueryChangedDiskAreas>changeId"`
}

const envelope = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

func invalidArgument(w http.ResponseWriter, msg string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, envelope, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`+msg+
		`</faultstring><detail><InvalidArgumentFault xmlns="urn:vim25" xsi:type="InvalidArgument">`+
		`<invalidProperty>changeId</invalidProperty></InvalidArgumentFault></detail></soapenv:Fault>`)
}

// answer serves QueryChangedDiskAreas: "*" gives every area written, "52 E/S" those written after
// S, refused when E is not the disk's current epoch (tracking was reset since).
func (t *tracking) answer(w http.ResponseWriter, body []byte) {
	var q query
	if err := xml.Unmarshal(body, &q); err != nil {
		invalidArgument(w, "malformed QueryChangedDiskAreas")
		return
	}
	key := fmt.Sprintf("%s/%d", q.This, q.DeviceKey)
	size := capacity(q.This, q.DeviceKey)
	t.mu.Lock()
	since := -1
	if q.ChangeID != "*" {
		var epoch, seq int
		if _, err := fmt.Sscanf(q.ChangeID, "52 %d/%d", &epoch, &seq); err != nil || epoch != t.epoch[key] {
			t.mu.Unlock()
			invalidArgument(w, "A specified parameter was not correct: changeId")
			return
		}
		since = seq
	}
	var picked []area
	for _, a := range t.areas[key] {
		if a.seq > since {
			picked = append(picked, a)
		}
	}
	t.mu.Unlock()
	sort.Slice(picked, func(i, j int) bool { return picked[i].start < picked[j].start })
	var merged []area
	for _, a := range picked {
		if n := len(merged); n > 0 && a.start <= merged[n-1].start+merged[n-1].length {
			if end := a.start + a.length; end > merged[n-1].start+merged[n-1].length {
				merged[n-1].length = end - merged[n-1].start
			}
			continue
		}
		merged = append(merged, a)
	}
	var out bytes.Buffer
	fmt.Fprintf(&out, `<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset><length>%d</length>`,
		q.StartOffset, size-q.StartOffset)
	for _, a := range merged {
		if a.start+a.length <= q.StartOffset {
			continue
		}
		fmt.Fprintf(&out, `<changedArea><start>%d</start><length>%d</length></changedArea>`, a.start, a.length)
	}
	out.WriteString(`</returnval></QueryChangedDiskAreasResponse>`)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	fmt.Fprintf(w, envelope, out.String())
}

func main() {
	model := simulator.VPX()
	model.Machine = 3 // per host and per cluster resource pool: 6 VMs, one datastore
	defer model.Remove()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	// a fixed login, so that a wrong password is refused as by a real vCenter
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword("backup", "s3cret")}
	server := model.Service.NewServer()
	defer server.Close()

	t := &tracking{epoch: map[string]int{}, areas: map[string][]area{}}
	sim := model.Service.ServeMux
	front := http.NewServeMux()
	front.HandleFunc("/cbt/", t.record)
	front.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/sdk") {
			body, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			if bytes.Contains(body, []byte("<QueryChangedDiskAreas")) {
				t.answer(w, body)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		sim.ServeHTTP(w, r)
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = http.Serve(listener, front) }()
	u := *server.URL
	u.Host = listener.Addr().String()
	fmt.Println(u.String())
	_, _ = io.Copy(io.Discard, os.Stdin)
}
